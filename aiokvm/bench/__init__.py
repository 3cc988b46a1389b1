"""The benchmarks, reachable from the installed package: ``aiokvm bench NAME``.

Each module has ``main(argv)`` with the same options as before
(``--quick``, ``--repeat``, ``--only``, ``--json``, ``--plot``); the scripts
in ``benchmarks/`` are thin wrappers around them.  ``demo.py`` is
``aiokvm demo``; ``compare.py`` is ``aiokvm bench compare``.
"""

#: name -> module under aiokvm.bench, in the order ``aiokvm bench all`` runs them
BENCHMARKS = ("exits", "disk", "net", "boot", "bridge")
