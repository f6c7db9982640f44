"""Benchmarks of the boneage toolkit: data pipeline, training throughput, inference latency, accuracy.

Run them with ``python -m benchmarks.run`` (see ``benchmarks/README.md``). Every benchmark writes one
JSON file with fixed keys plus ``hardware`` and ``date``; ``benchmarks.run`` renders them into
``RESULTS.md``.
"""
