"""``xpsoftmax run``: one operation on ``.npy`` files of any size, in bounded memory.

``job.py`` opens and checks the files and holds the CPU path and the atomic output; ``gpu.py``
streams blocks through a GPU; ``dask.py`` spreads tasks over a Dask cluster; ``run.py`` picks
one of them for a run and writes the summary.
"""
