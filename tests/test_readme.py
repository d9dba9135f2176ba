"""README stays true: every registered optimizer is listed, every test file it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_opt import available_optimizers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_registered_optimizer_is_in_the_readme() -> None:
    missing = [n for n in available_optimizers() if f"`{n}`" not in README]
    assert not missing, f"add {missing} to README's optimizer table"


def test_every_cited_test_file_exists() -> None:
    cited = set(re.findall(r"`(tests/[\w/]+\.py)", README))
    assert cited, "the feature table cites no test"
    assert not [c for c in cited if not (ROOT / c).is_file()]
    for short in re.findall(r"`(test_\w+\.py)", README):
        assert list(ROOT.glob(f"tests/**/{short}")), short


def test_quick_start_has_exactly_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks)
    assert "lightning_opt demo" in blocks[0] and "pytest" in blocks[1]
