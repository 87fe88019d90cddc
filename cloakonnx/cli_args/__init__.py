"""The command line's argument groups, as Polygraphy's ``tools/args/``: each group is a class that
declares its click options once and parses their values into its part of the typed config.

A command is the list of its groups (a ``Command``); its body builds the config from them and calls
one library function. Adding an option is one ``Option(...)`` in its group: its declaration (name,
default, help) and where its value goes (``to="attack.steps"``, after ``convert``).

Only click and the standard library are imported here: ``cloakonnx --help`` stays fast.
"""
from .base import Argument, ArgGroup, Command, Option, Parsed, build
from .groups import (AttackArgs, DataArgs, LearnArgs, MaskArgs, ModelArgs, Output, OutputArgs, PreprocessArgs,
                     RayArgs, RuntimeArgs, SeedArgs, ThreadsArgs)
from .parse import (JoinsInputShapes, as_optional_path, as_path, join_input_shapes, negated, parse_eps, parse_floats,
                    parse_input_shapes, parse_names, parse_one_eps, parse_pair)

__all__ = ["ArgGroup", "Argument", "AttackArgs", "Command", "DataArgs", "JoinsInputShapes", "LearnArgs", "MaskArgs",
           "ModelArgs", "Option", "Output", "OutputArgs", "Parsed", "PreprocessArgs", "RayArgs", "RuntimeArgs",
           "SeedArgs", "ThreadsArgs", "as_optional_path", "as_path", "build", "join_input_shapes", "negated", "parse_eps",
           "parse_floats", "parse_input_shapes", "parse_names", "parse_one_eps", "parse_pair"]
