"""Prints the requirements of a requirements file whose package is not installed at all.

Used by setup_vllm.sh: vLLM's venv keeps the versions vLLM chose for the packages both need,
and gets ours only for the packages it lacks.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, version


def missing(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        try:
            version(name)
        except PackageNotFoundError:
            out.append(spec)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(" ".join(missing(f.readlines())))
