"""The README's `zmagic manifest` example runs as written on the datasets' layouts."""
import json
import shlex
from pathlib import Path

from zmagic_core.app.experiment_command import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_manifest_example_runs_on_the_dataset_layouts(tmp_path, monkeypatch):
    lines = [line for line in README.read_text().splitlines() if line.startswith("zmagic manifest ")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])[1:]
    options = dict(zip(argv[2::2], argv[3::2]))
    monkeypatch.chdir(tmp_path)
    # the folders it names, with the layouts app/manifest.py reads (names only: nothing is opened but captions)
    images, anno = Path(options["--images"]), Path(options["--annotations"])
    captions = Path(options.get("--captions", "no-captions-given"))
    for folder in (images, anno / "0", captions):
        folder.mkdir(parents=True)
    for n in range(int(options["--rows"]) + 1):
        (images / f"{n}.jpg").write_bytes(b"")
        (anno / "0" / f"{n:05d}_skin.png").write_bytes(b"")
        (captions / f"{n}.txt").write_text(f"person {n} smiles.\n")
    assert main(argv) == 0
    rows = [json.loads(line) for line in Path(options["--out"]).read_text().splitlines()]
    assert len(rows) == int(options["--rows"]) and rows[0]["conditions.0.prompt"].startswith("person ")
