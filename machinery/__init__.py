"""
The machinery: what makes the method run fast, on several processes, and reported; nothing a
learner needs to follow the method. The files at the repository's root are the method and
never import from here; train.py, the pipeline, hands this folder's wrappers to the method's
functions (a model to train through, a function to score a batch with), and the tools here
read what the method wrote.

    batching.py     length micro-batching: a batch's forward run as a few micro-batches of rows
                    of similar length, the same result up to float rounding
    distributed.py  torchrun: one run sharded over processes (DDP), rank 0 writes the files
    workers.py      the process pool that runs independent reward models and policies side by side
    devices.py      which device a run uses
    report.py       stage 5's files: results.json, results.md, plots, the token-reward HTML, sweeps
    analysis.py     figures and tables across finished runs: the frontier, comparisons, the labs
    export.py       a trained policy as a Hugging Face GPT-2 directory that transformers loads
    bench.py        speed and memory figures, as JSON
"""
