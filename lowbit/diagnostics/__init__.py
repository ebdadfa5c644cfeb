"""Numerics diagnostics: per-operand statistics (`stats`), `lowbit doctor` (`doctor`), and the
dynamic-precision controller of the ``auto`` recipe (`auto`). See docs/diagnostics.md."""
