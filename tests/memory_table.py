"""Reading the memory table a run prints (`lowbit.memory.Breakdown.table`) in tests."""


def memory_rows(table: str) -> dict[str, tuple[int, int | None]]:
    """(estimate, measured) bytes of each component of the trainer's memory table; measured None
    where the run measures none (a logits gradient where the loss is on no layer's output)."""
    rows = {}
    for line in table.splitlines():  # columns of `Breakdown.table`
        rows[line[:24].strip()] = (line[24:38].replace(",", ""), line[59:73].replace(",", ""))
    return {
        k: (int(a), int(b) if b.strip() else None)
        for k, (a, b) in rows.items()
        if a.strip().isdigit()
    }
