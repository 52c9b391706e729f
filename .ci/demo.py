"""Run a notebook headless and print each cell with what it showed."""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
nb = nbformat.read(src, as_version=4)
for cell in nb.cells:
    if cell.cell_type == "code":
        cell.outputs = []
NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
               resources={"metadata": {"path": str(src.parent)}}).execute()
out_dir.mkdir(parents=True, exist_ok=True)
nbformat.write(nb, out_dir / src.name)
for cell in nb.cells:
    if cell.cell_type != "code":
        continue
    print("\n".join(f">>> {line}" for line in cell.source.splitlines()))
    for o in cell.outputs:
        if o.output_type == "stream":
            print(o.text.rstrip())
        elif o.output_type in ("display_data", "execute_result"):
            text = o.get("data", {}).get("text/plain", "")
            if text:
                print(text.rstrip())
        elif o.output_type == "error":
            print(f"{o.ename}: {o.evalue}")
    print()
print(f"executed notebook: {out_dir / src.name}")
