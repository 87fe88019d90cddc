"""Options, groups and commands: the machinery under the argument groups (as Polygraphy's ``BaseArgs``).

An ``Option`` is a click option declared once, with where its value goes: ``to`` names the config
fields it fills ("attack.steps": a field of the nested config), after ``convert``. An ``ArgGroup`` is a
tuple of options; its ``parse`` turns their values into config fields, or into what else its command
needs (the model, the data, the output). A ``Command`` is the list of its groups: it adds their options
to a click command and parses them, in order, into one ``Parsed``.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable

import click


class Option:
    """``Option(*click_declarations, to=FIELDS, convert=FN, **click_attributes)``.

    The value's name (``dest``) is click's, derived from the declarations. ``convert(value, flag)`` gets
    the option's flag for its errors. Without ``to``, the option's group reads it in its ``parse``."""

    param_class: type[click.Parameter] = click.Option
    decorator_factory: Callable = staticmethod(click.option)

    def __init__(self, *decls: str, to: str | tuple[str, ...] = (), convert: Callable | None = None, **attrs):
        self.decls, self.attrs, self.convert = decls, attrs, convert
        self.to = (to,) if isinstance(to, str) else tuple(to)
        param = self.param_class(list(decls), **attrs)
        self.dest = param.name
        self.flag = max(param.opts, key=len)  # --output rather than -o: the name errors use

    def decorator(self) -> Callable:
        return self.decorator_factory(*self.decls, **self.attrs)

    def value(self, kw: dict) -> Any:
        value = kw[self.dest]
        return self.convert(value, self.flag) if self.convert else value


class Argument(Option):
    """A positional argument (MODEL), declared and read as an ``Option`` is."""

    param_class = click.Argument
    decorator_factory = staticmethod(click.argument)


class Parsed:
    """What a command's groups made of its values: ``fields`` of its config, and attributes such as
    ``model``, ``data`` or ``output`` set by the groups that own them."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def config(self, cls, **fields):
        """``cls`` (a config dataclass) from the groups' fields and ``fields``."""
        return build(cls, {**self.fields, **fields})


class ArgGroup:
    """A group of options (as a Polygraphy argument group): declares them once, in ``options``, and
    parses their values. The default ``parse`` puts each value in the fields its option names."""

    options: tuple[Option, ...] = ()

    def values(self, kw: dict) -> SimpleNamespace:
        """This group's values from click's keyword arguments, converted, by ``dest``."""
        return SimpleNamespace(**{option.dest: option.value(kw) for option in self.options})

    def parse(self, values: SimpleNamespace, parsed: Parsed) -> None:
        for option in self.options:
            for name in option.to:
                parsed.fields[name] = getattr(values, option.dest)


class Command:
    """A command's groups, in the order its ``--help`` lists their options. As a decorator, it adds
    their options to a click command; ``parse`` turns click's keyword arguments into a ``Parsed``."""

    def __init__(self, *groups: ArgGroup):
        self.groups = groups
        dests = [option.dest for group in groups for option in group.options]
        duplicated = sorted({d for d in dests if dests.count(d) > 1})
        if duplicated:
            raise ValueError(f"options declared twice in one command: {', '.join(duplicated)}")

    def __call__(self, fn: Callable) -> Callable:
        for group in reversed(self.groups):
            for option in reversed(group.options):
                fn = option.decorator()(fn)
        return fn

    def parse(self, kw: dict) -> Parsed:
        parsed = Parsed()
        for group in self.groups:
            group.parse(group.values(kw), parsed)
        return parsed


def build(cls, fields: dict[str, Any]):
    """``cls(**fields)``; a dotted name ("attack.steps") sets that field of a copy of the nested default."""
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = value
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for head, values in nested.items():
        field = defaults[head]
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        flat[head] = dataclasses.replace(default, **values)
    return cls(**flat)
