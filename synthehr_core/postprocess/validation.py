"""Validation plumbing of the KDE config (``kde_config.py``) and its grid methods (``axes.py``).

A config section is a frozen pydantic model (``Section``). Its checks raise messages that read on from the key
path, so a problem names the key, shows the value and says the fix:

* ``bad("must be a positive number.")`` -> ``variable_config.age.grid_params.step = -1 must be a positive number.``
* ``bad_section("max = 10 < min = 18; swap them.")`` -> ``variable_config.age.grid_params: max = 10 < min = 18; ...``

Unknown keys are one problem per section, reported together with the problems of its known keys.
``problems(exc)`` turns a pydantic ValidationError into those lines; shown values are cut to ``SHOW_CHARS``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .. import errors

SHOW_CHARS = 80          # longest value echoed in a message: a hostile 1 MB list must not become a 1 MB error
VALUE, SECTION = "kde_value", "kde_section"   # error kinds: "key = value msg" and "key: msg"


def show(value: Any) -> str:
    return errors.show(value, SHOW_CHARS)


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def bad(msg: str) -> PydanticCustomError:
    """The value of one key is wrong; shown as ``key = value msg``."""
    return PydanticCustomError(VALUE, "{m}", {"m": msg})


def bad_section(msg: str) -> PydanticCustomError:
    """A section is wrong as a whole (keys that clash); shown as ``key: msg``, so ``msg`` shows the values."""
    return PydanticCustomError(SECTION, "{m}", {"m": msg})


def inside(title: str, problems: list[tuple[tuple, Any, PydanticCustomError]]) -> ValidationError:
    """Problems at keys *inside* the value being validated, ``(loc, value, error)`` each; raised from a validator,
    pydantic puts the caller's key path in front of every ``loc``."""
    return ValidationError.from_exception_data(title, [InitErrorDetails(type=e, loc=loc, input=v)
                                                       for loc, v, e in problems])


def _again(err: dict) -> tuple[tuple, Any, PydanticCustomError]:
    """A reported error as a problem to raise again (its kind and message kept)."""
    ctx = err.get("ctx") or {}
    return err["loc"], err["input"], PydanticCustomError(err["type"], "{m}", {"m": ctx.get("m", err["msg"])})


class Section(BaseModel):
    """A strict, frozen config section: unknown keys are one problem naming them and the allowed keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    what: ClassVar[str] = "this section"             # the section in the unknown-keys message
    implicit_keys: ClassVar[tuple[str, ...]] = ()    # keys the caller reads before this model (e.g. 'method')

    @classmethod
    def prepare(cls, data: dict) -> dict:
        """Fill keys whose default depends on other keys; raise ``bad_section`` for keys that clash."""
        return data

    def check(self) -> None:
        """Checks across valid keys (e.g. min <= max); raise ``bad_section``."""

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return sorted({*cls.model_fields, *cls.implicit_keys})

    @classmethod
    def unknown_keys(cls, unknown: list[str]) -> PydanticCustomError:
        return bad_section(f"unknown keys {show(unknown)} for {cls.what}; allowed: {cls.allowed_keys()}.")

    @model_validator(mode="wrap")
    @classmethod
    def _strict_keys(cls, data: Any, handler):
        if not isinstance(data, Mapping):
            return handler(data)
        unknown = sorted(str(k) for k in data if k not in cls.model_fields)
        found = [((), data, cls.unknown_keys(unknown))] if unknown else []
        try:
            model = handler(cls.prepare({k: v for k, v in data.items() if k in cls.model_fields}))
            model.check()
        except PydanticCustomError as exc:
            raise inside(cls.__name__, [*found, ((), data, exc)]) from None
        except ValidationError as exc:
            raise inside(cls.__name__, [*found, *map(_again, exc.errors())]) from None
        if found:
            raise inside(cls.__name__, found)
        return model


def _key(part: Any) -> str:
    text = str(part)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 3] + "..."


def problems(exc: ValidationError, root: tuple = ()) -> list[str]:
    """One line per problem: the key path (under ``root``), the value shown, the message."""
    out = []
    for err in exc.errors():
        key = ".".join(_key(p) for p in (*root, *err["loc"]))
        msg = (err.get("ctx") or {}).get("m", err["msg"])
        if err["type"] == VALUE:
            out.append(f"{key} = {show(err['input'])} {msg}")
        elif err["type"] == SECTION:
            out.append(f"{key}: {msg}" if key else msg)
        elif err["type"] == "missing":
            out.append(f"{key}: required key is missing; add it (docs/kde.md lists every key).")
        else:                                       # a pydantic type check (e.g. a number where a name belongs)
            out.append(f"{key} = {show(err['input'])}: {msg}.")
    return out
