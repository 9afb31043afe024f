"""What the benchmark scripts of ``benchmarks/`` share, one concern per module.

* ``workloads.py``: the models, as the training builds them (:class:`Workload`), and their
  compiled training step and forward pass (``TrainingBench``, ``InferenceBench``);
* ``timing.py``: functions timed in turns, summarised by their median;
* ``memory_use.py``: XLA's memory analysis, device and process peaks, the memory budget;
* ``isolated.py``: a function run in a fresh process, for its own peak memory;
* ``series.py``: a series of measurements over a size, each model stopping at its budget;
* ``machine.py``: the machine and the code a result was measured on;
* ``output.py``: the printed table, the JSON file and the figures;
* ``arguments.py``: the command-line flags the scripts share.

Every script takes argparse flags for its sizes, prints a table and writes a JSON file whose
``"machine"`` entry comes from ``machine.machine_info``.
"""
