"""Names that reach SQL or a shell are validated first; bad ones get a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import DbopsError
from core.names import NAME_RE, validate_name, validate_server_name


@given(st.text(max_size=200))
def test_anything_accepted_is_a_plain_identifier(value: str) -> None:
    try:
        out = validate_name(value)
    except DbopsError as exc:
        assert "not a valid customer name" in str(exc)
        assert len(str(exc)) < 250  # a 10 KB name is not echoed back whole
        return
    assert NAME_RE.fullmatch(out)
    assert out.isascii() and out == out.lower()


@pytest.mark.parametrize(
    "bad",
    [
        "acme; rm -rf /",
        "acme'--",
        "$(reboot)",
        "`id`",
        "ac me",
        "Acme",
        "ácme",
        "a",
        "x" * 10_000,
        "acme\n",
        "",
        "1acme",
        "acme-prod",
    ],
)
def test_hostile_names_are_refused(bad: str) -> None:
    with pytest.raises(DbopsError) as exc:
        validate_name(bad)
    assert len(str(exc.value)) < 250


def test_server_names_allow_hyphens_not_shell() -> None:
    assert validate_server_name("vps-2") == "vps-2"
    for bad in ["vps2;ls", "../etc", "vps 2", "VPS2", "x" * 100]:
        with pytest.raises(DbopsError):
            validate_server_name(bad)
