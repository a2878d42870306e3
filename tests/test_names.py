"""User-supplied names (keys, state ids, metadata keys) never select a path outside the store."""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass, field

import pytest
import torch

import distckpt
from distckpt.format.layout import ROWS_DIR, row_name
from distckpt.format.names import escape_component, unescape_component
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD

NAME_MAX = 255

LONG = "x" * 300
TRICKY = [
    "../x",
    "a/b",
    "..",
    ".",
    ".hidden",
    "...",
    "a\x00b",
    "\x00",
    LONG,
    "température",
    "温度",
    "🌡️🔥",
    "",
    " ",
    "../../../../../../etc/passwd",
    "/abs/evil",
    "a\\b",
    "~",
    "%",
    "%2F",
    "%25",
    "a%2Fb",
    "new\nline",
    "tab\there",
    "A",
    "a",
    "\udcff",  # a lone surrogate (what os.fsdecode makes of an undecodable byte)
    "y" * 100 + "a" * 200,
    "y" * 100 + "b" * 200,
    "y" * 100 + "a" * 199 + "b",
    "y" * 119,
    "y" * 120,
    "y" * 121,
    "é" * 40,  # 80 bytes escaped to 240 characters
    "é" * 41,
]


@pytest.mark.parametrize("name", TRICKY, ids=lambda n: repr(n)[:40])
def test_escaped_name_is_one_safe_component(name):
    escaped = escape_component(name)
    assert escaped, "an empty component would name the parent directory"
    assert "/" not in escaped and "\x00" not in escaped and "\\" not in escaped
    assert escaped not in (".", "..")
    assert not escaped.startswith(".")
    assert len(escaped.encode("utf-8", "surrogatepass")) <= NAME_MAX
    assert escaped.isprintable()
    assert escape_component(name) == escaped, "escaping must be deterministic"


def test_escaping_is_injective():
    escaped = {escape_component(n) for n in TRICKY}
    assert len(escaped) == len(set(TRICKY))


def test_long_names_differing_late_stay_distinct():
    prefix = "z" * 150
    names = [prefix + suffix for suffix in ("", "a", "b", "ab", "ba", "\x00", "/", "é")]
    names += ["q" * 100 + "r" * n for n in range(150, 160)]
    assert len({escape_component(n) for n in names}) == len(names)


@pytest.mark.parametrize("name", TRICKY, ids=lambda n: repr(n)[:40])
def test_unescape_inverts_escape_or_admits_shortening(name):
    back = unescape_component(escape_component(name))
    assert back is None or back == name
    if len(name) <= 20:
        assert back == name


# -- end to end ------------------------------------------------------------------------------


def tree_of_names(value_for) -> dict:
    """A state_dict whose keys, at every level, are the tricky names."""
    state: dict = {}
    for i, name in enumerate(TRICKY):
        state[name] = {name: value_for(i), i: small(i + 1000), "plain": {name: [name]}}
    return state


def small(i: int) -> torch.Tensor:
    return torch.full((3,), float(i))


def large(i: int) -> torch.Tensor:
    """Its own array (named after the escaped key) for the first names, packed for the rest."""
    n = DEFAULT_PACK_THRESHOLD // 4 + 1 if i < N_LARGE else 3
    return torch.full((n,), float(i))


N_LARGE = 16


def files_and_dirs(top) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return out


def assert_confined(tmp_path, store, allowed_ancestors) -> None:
    """Everything under tmp_path is the store, inside it, or one of its (pre-made) parents."""
    root = os.path.realpath(store)
    ancestors = {os.path.realpath(a) for a in allowed_ancestors}
    for path in files_and_dirs(tmp_path):
        real = os.path.realpath(path)
        assert real == root or real.startswith(root + os.sep) or real in ancestors, (
            f"{path} was created outside the store {store}"
        )


def deep_store(tmp_path):
    """A store six levels down, so '../..' escapes would still land inside tmp_path."""
    parent = tmp_path.joinpath("d1", "d2", "d3", "d4", "d5")
    parent.mkdir(parents=True)
    ancestors = [parent, *list(parent.parents)[: len(parent.relative_to(tmp_path).parts) - 1]]
    return parent / "store", ancestors


def assert_tree_equal(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            assert_tree_equal(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_tree_equal(g, w)
    else:
        assert got == want


@pytest.mark.parametrize("make", [small, large], ids=["packed", "own_arrays"])
def test_save_with_tricky_keys_stays_in_the_store_and_restores(tmp_path, make):
    store, ancestors = deep_store(tmp_path)
    state = tree_of_names(make)
    # An absolute key that points into tmp_path: if it were used as a path, we would see it.
    state[str(tmp_path / "escaped")] = {"w": make(1)}
    meta = {name: name for name in TRICKY}
    meta["nested"] = {name: i for i, name in enumerate(TRICKY)}

    row = distckpt.save(state, store, **meta)

    assert_confined(tmp_path, store, ancestors)
    data_dir = store / ROWS_DIR / row_name(row) / "data"
    # Whatever the names and sizes, one shard file per rank (no name becomes a path).
    assert sorted(p.name for p in data_dir.iterdir()) == ["c.0.0", "zarr.json"]
    out: dict = {}
    distckpt.load(out, store)
    assert_tree_equal(out, state)
    assert distckpt.metadata(store) == meta


@dataclass
class EvilState:
    weight: torch.Tensor = field(default_factory=lambda: torch.zeros(4))
    big: torch.Tensor = field(default_factory=lambda: torch.zeros(DEFAULT_PACK_THRESHOLD // 4 + 1))
    scalar: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    notes: dict = field(default_factory=dict)


def _write_and_restore(store) -> tuple[EvilState, bool]:
    for pack_threshold in (DEFAULT_PACK_THRESHOLD, 0):  # packed, then every tensor its own array
        ckpt = distckpt.Checkpoint("../../evil", path=store, pack_threshold=pack_threshold)
        with ckpt as session:
            state = EvilState(
                weight=torch.arange(4.0),
                big=torch.full_like(EvilState().big, 2.5),
                scalar=torch.tensor(7.0),
                notes={"../..": 1, "/": 2, "..": {"\x00": 3}},
            )
            distckpt.bind_checkpoint_state(state, state_id="../../evil")
            distckpt.bind_checkpoint_state(EvilState(), state_id="/absolute/evil")
            session.write(**{"../../meta": 1, "/abs": 2})
    ckpt = distckpt.Checkpoint("../../evil", path=store)
    with ckpt:
        restored = distckpt.bind_checkpoint_state(EvilState(), state_id="../../evil")
        loaded = restored.checkpoint_state_loaded
        return restored.checkpoint_dataclass, loaded


def test_bound_state_with_evil_state_id_stays_in_the_store(tmp_path):
    store, ancestors = deep_store(tmp_path)
    # Run in a copied context so this test's Checkpoint never becomes other tests' current one.
    restored, loaded = contextvars.copy_context().run(_write_and_restore, store)
    assert_confined(tmp_path, store, ancestors)
    assert loaded
    assert torch.equal(restored.weight, torch.arange(4.0))
    assert torch.equal(restored.big, torch.full_like(restored.big, 2.5))
    assert restored.scalar.item() == 7.0
    assert restored.notes == {"../..": 1, "/": 2, "..": {"\x00": 3}}


@pytest.mark.parametrize("name", ["../../evil", "/abs/evil"])
def test_checkpoint_name_stays_under_the_default_home(tmp_path, monkeypatch, name):
    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("DISTCKPT_HOME", str(home))
    path = distckpt.default_checkpoint_path(name)
    base = os.path.realpath(home / "checkpoints")
    assert os.path.realpath(path).startswith(base + os.sep)
