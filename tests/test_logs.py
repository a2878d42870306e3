"""The library logs (never prints), and every record says which rank emitted it."""

from __future__ import annotations

import logging

import torch

import distckpt


def test_records_carry_the_rank(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    caplog.set_level(logging.DEBUG, logger="distckpt")
    distckpt.save({"x": torch.ones(2)}, tmp_path, keep=1)
    distckpt.save({"x": torch.ones(2)}, tmp_path, keep=1)  # prunes row 0: logged
    records = [r for r in caplog.records if r.name.startswith("distckpt.")]
    assert records, "pruning a row should be logged"
    assert all(r.rank == 3 for r in records)


def test_nothing_is_printed(tmp_path, capsys):
    distckpt.save({"x": torch.ones(2)}, tmp_path, keep=1)
    distckpt.save({"x": torch.ones(2)}, tmp_path, keep=1)
    distckpt.load({"x": torch.zeros(2)}, tmp_path)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
