"""Replaces a folder through `hf_sft.writer.new_folder`, slowly, so a test can SIGKILL it at any moment.

usage: writer_child.py DEST VERSION N_FILES
Writes N_FILES files whose contents name VERSION into DEST's temporary sibling, then commits.
"""

import sys
import time
from pathlib import Path

from hf_sft.writer import new_folder

dest, version, n_files = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
with new_folder(dest, command="test") as tmp:
    for i in range(n_files):
        (tmp / f"part-{i:03d}.txt").write_text(f"{version} {i}\n" * 2000)
        time.sleep(0.002)
