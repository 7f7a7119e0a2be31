"""Weighted mixing of data entries: how many training examples each ``data.train`` entry contributes.

The semantics of ``weight``, ``fraction`` and ``max_rows`` are documented once, in ``data.train``'s help
(:class:`rewardforge.config.DataConfig`); ``max_rows`` is applied while reading (:func:`build_dataset`, and
:func:`~rewardforge.data.lists.build_list_dataset` for lists), the other two here, to the training examples (pairs,
rated responses or lists) after the validation split. Every selection is a set of indices over the (memory-mapped)
dataset: nothing is copied, and repeats cost an index each.

Example:
    >>> import numpy as np
    >>> from rewardforge.config import DataSource
    >>> from rewardforge.data.datasets import PairDataset
    >>> ds = PairDataset([np.array([1], np.int32)] * 4, [np.array([2], np.int32)] * 4, [np.nan] * 4, list("abcd"),
    ...                  [{}] * 4, source=[0, 0, 0, 1])
    >>> mixed, counts = mix_sources(ds, [DataSource("a", weight=1), DataSource("b", weight=1)], seed=0)
    >>> [(c["train_examples"], c["taken"]) for c in counts]
    [(3, 2), (1, 2)]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rewardforge.data.readers import DataError


def _setting(entry, name: str):
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _path(entry) -> str:
    return str(entry.get("path", "")) if isinstance(entry, dict) else str(entry)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _random_part(positions: np.ndarray, k: int, seed: int, entry: int) -> np.ndarray:
    """``k`` of ``positions`` chosen at random, in their order. The legacy RandomState keeps its stream across numpy
    versions, so a seed selects the same examples everywhere."""
    pick = np.random.RandomState([seed, entry]).permutation(len(positions))[:k]
    return positions[np.sort(pick)]


def planned_counts(available: Sequence[int], entries: Sequence, where: str = "data.train") -> list[int]:
    """How many training examples each entry contributes, given how many it has (``available``)."""
    weights = [_setting(e, "weight") for e in entries]
    if any(w is not None for w in weights):
        total, weight_sum = sum(available), float(sum(weights))
        shares = [total * w / weight_sum for w in weights]
        out = [int(np.floor(x)) for x in shares]
        # largest remainders (ties: the earlier entry) get the examples rounding down left over: exactly `total` in all
        for k in sorted(range(len(out)), key=lambda k: (out[k] - shares[k], k))[: total - sum(out)]:
            out[k] += 1
        for k, (n, want) in enumerate(zip(available, out)):
            if want and not n:
                raise DataError(f"{where}[{k}] ({_path(entries[k])}) has no training examples, but its weight asks for {want} "
                                "of the mixture; give it data or remove the entry")
        return out
    fractions = [_setting(e, "fraction") for e in entries]
    return [n if f is None else _round(n * f) for n, f in zip(available, fractions)]


def mix_sources(ds, entries: Sequence, seed: int, per_source: Sequence[dict[str, Any]] | None = None):
    """The training examples ``entries``' weights and fractions ask for, and what each entry gave.

    Args:
        ds: a dataset whose ``source`` says which entry each example came from (``build_dataset`` and
            ``build_list_dataset`` set it; for lists an example is a list).
        entries: the ``data.train`` entries (paths, :class:`~rewardforge.config.DataSource` or mappings).
        seed: fixes every random choice (``train.seed``).
        per_source: the data report's records of the entries, extended in the returned copy.

    Returns:
        ``(dataset, records)``: ``ds`` itself when no entry has a weight or fraction, else a subset view (an index
        array; an entry with less than its share is repeated); one record per entry with ``train_examples`` (what it
        had) and ``taken``.
    """
    if getattr(ds, "source", None) is None:  # a registered kind whose dataset does not record each example's entry
        mixed = [k for k, e in enumerate(entries) if any(_setting(e, n) is not None for n in ("weight", "fraction", "max_rows"))]
        if mixed:
            raise DataError(f"data.train[{mixed[0]}] ({_path(entries[mixed[0]])}) sets weight/fraction/max_rows, but this kind "
                            f"of data ({type(ds).__name__}) has no 'source' (each example's entry) to mix by; give plain paths "
                            "in data.train, or have its build record dataset.source")
        return ds, [dict(per_source[k]) if per_source else {"source": _path(e)} for k, e in enumerate(entries)]
    positions = [np.flatnonzero(ds.source == k) for k in range(len(entries))]
    available = [len(p) for p in positions]
    counts = planned_counts(available, entries)
    records = [dict(per_source[k]) if per_source else {"source": _path(e)} for k, e in enumerate(entries)]
    for k, e in enumerate(entries):
        records[k].update(train_examples=available[k], taken=counts[k])
        for name in ("weight", "fraction"):
            if _setting(e, name) is not None:
                records[k][name] = _setting(e, name)
    if counts == available and not any(_setting(e, "weight") is not None for e in entries):
        return ds, records
    parts = []
    for k, (pos, want) in enumerate(zip(positions, counts)):
        copies, rest = divmod(want, len(pos)) if len(pos) else (0, 0)
        parts += [pos] * copies + [_random_part(pos, rest, seed, k)]
    return ds.subset(np.concatenate(parts) if parts else np.zeros(0, np.int64)), records


def describe_sources(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per entry for the terminal (rows read, examples, training examples, taken); none for one plain entry."""
    if len(records) < 2 and not any(r.get(name) is not None for r in records for name in ("weight", "fraction", "max_rows")):
        return []
    lines = []
    for k, r in enumerate(records):
        how = ", ".join(f"{name} {r[name]}" for name in ("weight", "fraction", "max_rows") if r.get(name) is not None)
        lines.append(f"  data.train[{k}] {r.get('source')}: {r.get('rows_read', 0)} rows read, {r.get('examples', 0)} examples, "
                     f"{r.get('train_examples', 0)} for training, {r.get('taken', 0)} taken" + (f" ({how})" if how else ""))
    return lines
