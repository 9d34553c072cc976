"""The project files a command runs code in: `python benchmarks/code_files.py SCRIPT ARGS...`

Runs SCRIPT (e.g. train.py) with ARGS in this process under a profile hook that records the
file of every Python function called, here and in forked children (DataLoader workers), and
prints how many files under src/ ran a function, then their names. Module and class bodies
(code an import runs; their code objects lack CO_OPTIMIZED) are not counted:
`--bodies` counts them too. Example, the design card's command on the sample:

    python benchmarks/code_files.py train.py model=mobilenetv2 trainer.max_epochs=2 \\
        data.root=../shared/data/concrete-crack-sample model.weights_path=W paths.output_dir=OUT
"""

from __future__ import annotations

import atexit
import inspect
import json
import os
import runpy
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

PROJECT = Path(__file__).resolve().parents[1] / "src"


def main() -> None:
    bodies = "--bodies" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--bodies"]
    if not args:
        raise SystemExit(__doc__)
    seen: set[str] = set()
    lists = Path(tempfile.mkdtemp(prefix="code_files_"))

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        function = code.co_flags & inspect.CO_OPTIMIZED
        if event == "call" and code.co_name != "<module>" and (bodies or function):
            seen.add(code.co_filename)

    def dump() -> None:
        names = sorted(f for f in list(seen) if f.startswith(str(PROJECT)))
        (lists / f"{os.getpid()}.json").write_text(json.dumps(names))

    def in_child() -> None:  # a forked worker: its own list, written however it exits
        seen.clear()
        import multiprocessing.util

        multiprocessing.util.Finalize(None, dump, exitpriority=-100)
        os_exit = os._exit

        def exit_after_dump(code: int) -> None:
            dump()
            os_exit(code)

        os._exit = exit_after_dump

    def report() -> None:
        dump()
        files: set[str] = set()
        for part in lists.glob("*.json"):
            files |= set(json.loads(part.read_text()))
        names = sorted(str(Path(f).relative_to(PROJECT)) for f in files)
        print(
            f"{len(names)} project files ran {'code' if bodies else 'a function'}", file=sys.stderr
        )
        print("\n".join(names), file=sys.stderr)

    main_pid = os.getpid()
    os.register_at_fork(after_in_child=in_child)
    atexit.register(lambda: report() if os.getpid() == main_pid else None)
    sys.setprofile(hook)
    threading.setprofile(hook)
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
