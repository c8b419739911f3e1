"""Rebuild README.md's per-command sections and docs/BENCHMARKS.md from their parts:
docs/readme/NN-*.md go between the README's <!-- sections --> markers (before '## Python API'),
docs/bench/NN-*.md are concatenated under a header into docs/BENCHMARKS.md.

    python docs/assemble.py      (from the repository root)
"""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- sections -->", "<!-- /sections -->"
BENCH_HEADER = ("# Benchmarks\n\nEvery figure below comes from a script under `bench/`; the command that printed it "
                "is given with it.\nMachine unless noted: this project's 2-core x86-64 development/CI machine (no GPU), "
                "torch 2.13.0 CPU.\nFigures measured while other jobs shared the two cores are marked as such; "
                "they are noisy.\n")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def main():
    readme_path = os.path.join(ROOT, "README.md")
    readme = _read(readme_path)
    if BEGIN in readme:
        a, b = readme.index(BEGIN), readme.index(END) + len(END)
        readme = readme[:a].rstrip("\n") + "\n\n" + readme[b:].lstrip("\n")
    end = readme.index("## Python API")
    secs = "".join(_read(f).rstrip() + "\n\n" for f in sorted(glob.glob(os.path.join(ROOT, "docs/readme/*.md"))))
    readme = readme[:end].rstrip("\n") + "\n\n" + BEGIN + "\n" + secs + END + "\n\n" + readme[end:]
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(readme)
    parts = [BENCH_HEADER] + [_read(f).rstrip() + "\n" for f in sorted(glob.glob(os.path.join(ROOT, "docs/bench/*.md")))]
    with open(os.path.join(ROOT, "docs/BENCHMARKS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
