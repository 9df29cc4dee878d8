"""``python -m tests.faults.paced_job MODULE SECONDS [key=value ...]``: runs ``MODULE.main`` with a pause after
each file it writes through ``write_table_atomic`` (``pipelines.resume``), so that a fault test's kill lands
between two files however fast the machine is. The job's work and output are otherwise its own."""

from __future__ import annotations

import importlib
import sys
import time


def main(argv: list[str]) -> int:
    module, seconds, *args = argv
    job = importlib.import_module(module)
    write = job.write_table_atomic

    def paced(table, path):
        write(table, path)
        time.sleep(float(seconds))

    job.write_table_atomic = paced
    return job.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
