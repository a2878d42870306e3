"""Side-by-side benchmarks of distckpt against raw I/O, torch.save, DCP and Earth2Studio.

Run ``python -m benchmarks`` (see ``benchmarks/README.md``). Modules:

- ``common``: configuration, rank context (one process or torch.distributed), timing, records;
- ``tools``: the checkpointing tools being compared, behind one small interface;
- ``cases``: the measurements (save, restore, small tensors, checksums, election);
- ``worker``: the torchrun entry point that runs the per-rank cases on N ranks;
- ``report``: derived ratios, the table, ``results.json`` and the plot;
- ``profile``: cProfile of distckpt's save and load on one rank.
"""
