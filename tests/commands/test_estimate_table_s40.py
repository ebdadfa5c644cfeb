"""The several-recipe `lowbit estimate` table adds up: each row's model states + activations +
temporaries + logits' gradient, or + the DDP bucket rebuild where that is marked ``*`` (the
larger, which sets the peak), is its total (session 40: the total counted the logits' gradient and
the rebuild, which the table had no column for)."""

from lowbit.cli import main

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _table(capsys, argv: list[str]) -> list[dict[str, str]]:
    """The table's rows as ``{column title: cell}`` (cells are 13 wide after the 17-wide recipe)."""
    assert main(["estimate", "--model", "tiny", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("recipe "))
    head, rows = lines[at], lines[at + 2 : lines.index("", at)]
    titles = [head[i : i + 13].strip() for i in range(17, head.index("vs "), 13)]
    return [
        {"recipe": row[:17].strip()}
        | {title: row[17 + 13 * k : 30 + 13 * k].strip() for k, title in enumerate(titles)}
        for row in rows
    ]


def _bytes(cell: str) -> tuple[float, float]:
    """A printed size in bytes, and half its last digit's worth (the rounding)."""
    value, unit = cell.rstrip("*").split()
    return float(value) * UNITS[unit], (0.5 if unit == "B" else 0.005) * UNITS[unit]


def _check_adds_up(row: dict[str, str]) -> None:
    terms = ["model states"]
    if row.get("DDP rebuild", "").endswith("*"):
        terms.append("DDP rebuild")
    else:
        terms += ["activations", "temporaries", "logits grad"]
    parts = [_bytes(row.get(term, "0 B")) for term in terms]  # a missing column: 0
    total, slack = _bytes(row["total"])
    assert abs(sum(v for v, _ in parts) - total) <= slack + sum(s for _, s in parts), row


def test_every_row_adds_up_to_its_total(capsys):
    rows = _table(capsys, ["--recipe", "fp32,bf16-mixed,bf16-low", "--seq", "64"])
    assert [row["recipe"] for row in rows] == ["fp32", "bf16-mixed", "bf16-low"]
    assert "DDP rebuild" not in rows[0]  # one GPU: no rebuild, no column
    for row in rows:
        _check_adds_up(row)


def test_ddp_rows_add_up_with_the_rebuild_where_it_sets_the_peak(capsys):
    rows = _table(capsys, ["--recipe", "fp32,bf16-mixed,bf16-low", "--seq", "64", "--gpus", "2"])
    marked = [row["recipe"] for row in rows if row["DDP rebuild"].endswith("*")]
    assert marked == ["fp32"]  # fp32's activations at 64 tokens are below its gradients
    for row in rows:
        _check_adds_up(row)
