"""Fill-in-the-blank exercises on the pieces that carry the method; `python -m exercises.grade` grades them."""
