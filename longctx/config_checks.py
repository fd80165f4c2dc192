"""What a config's keys and values are checked for before OmegaConf types them: keys the schema has, values of
a shape their type can hold, YAML 1.1 scalars that mean other than they say, values left ??? (required), and
interpolations whose result would be other than the user meant. ConfigError names the key and the fix. Like
longctx.config, it imports nothing else of longctx."""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, fields, is_dataclass

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user error in a config file or override: the message names the key and the fix."""


def schema_keys(cls) -> dict:
    """Nested dict of the schema's keys (dataclass fields), leaves their declared types ("int", "str | None")."""
    out = {}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out[f.name] = schema_keys(type(default)) if is_dataclass(default) else str(f.type)
    return out


def leaf_type(schema: dict, dotted: str) -> str | None:
    node = schema
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def check_keys(data, schema: dict, prefix: str, source: str) -> None:
    """Keys the schema has, sections given as sections, and leaves of a shape their type can hold: a mapping or a
    nested list for a value or a list of numbers, anything but true/false for a switch (OmegaConf would fail
    with a TypeError, or turn 255 into true)."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in schema:
            names = [f"{prefix}{k}" for k in schema]
            close = difflib.get_close_matches(full, names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r} (in {source}){hint}")
        kind = schema[key]
        if isinstance(kind, dict):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} (in {source}) is a section; give its keys, e.g. "
                                  f"{full}.{next(iter(kind))}=...")
            check_keys(value, kind, f"{full}.", source)
        elif isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
            shape = "a list of numbers, e.g. [2,4]" if kind.startswith("list") else f"a single {kind} value"
            raise ConfigError(f"config key {full!r} (in {source}) takes {shape}, got {value!r}")
        elif value == "???":  # OmegaConf's MISSING: a merge would silently keep the default instead
            raise ConfigError(f"config key {full!r} (in {source}) is ???, a value still to be given: give it one, "
                              f"e.g. {full}=..., or drop the key for its default")
        elif kind == "bool" and not isinstance(value, bool) and not str(value).startswith("${"):
            raise ConfigError(f"config key {full!r} (in {source}) must be true or false, got {value!r}")


# Plain scalars YAML 1.1 (which OmegaConf's loader follows) reads as another number than the digits say, and
# YAML 1.2 and Python would not: a leading 0 makes 010 octal 8, a colon makes 1:30 base-60 90.
YAML11_ONLY_NUMBER = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def check_plain_scalar(node, value, kind: str, full: str, source: str) -> None:
    """A plain (unquoted) YAML scalar must mean what it says: a text key whose value YAML turned into a number or
    a switch (2024_01_05 into 20240105, `no` into false) asks for quotes; a number key refuses 010 and 1:30."""
    import yaml

    if isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        for item_node, item in zip(node.value, value):
            check_plain_scalar(item_node, item, kind, full, source)
        return
    if not isinstance(node, yaml.ScalarNode) or node.style is not None or value is None or isinstance(value, str):
        return  # quoted text is as typed; text and null are what they say
    text = node.value
    if kind.startswith("str") and str(value) != text:
        raise ConfigError(f"config key {full!r} (in {source}) takes text, but YAML reads {text} as {value!r}: quote "
                          f"it, {full.rsplit('.', 1)[-1]}: '{text}'")
    if YAML11_ONLY_NUMBER.fullmatch(text) and not isinstance(value, bool):
        if ":" in text:
            why = "a colon makes a base-60 number"
        else:
            decimal = int(text.replace("_", ""), 10)
            if value == decimal:
                return  # 01 is 1 however it is read
            why = f"a leading 0 makes an octal number; write {decimal}"
        raise ConfigError(f"config key {full!r} (in {source}): YAML reads {text} as {value} ({why})")


def check_file_scalars(node, data, schema: dict, prefix: str, source: str) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        return
    for key_node, value_node in node.value:  # (a `<<` merge's keys are checked where its anchor is written)
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in data or key not in schema:
            continue
        if isinstance(schema[key], dict):
            check_file_scalars(value_node, data[key], schema[key], f"{prefix}{key}.", source)
        else:
            check_plain_scalar(value_node, data[key], schema[key], f"{prefix}{key}", source)


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${section.key}: resolvers (oc.env:...) and ${.rel} are not


def check_interpolations(cfg, schema: dict) -> None:
    """Interpolations, with the whole config merged: a switch given `${key}` must resolve to true or false (OmegaConf
    would turn 20 into true), and a text that embeds a key that is null would read it as the word None
    (checkpoint.dir='${run_dir}/ck' with run_dir unset wrote into ./None/ck)."""
    _check_interpolations(cfg, schema, OmegaConf.to_container(cfg, resolve=False), "")


def _check_interpolations(cfg, schema: dict, raw, prefix: str) -> None:
    for key, kind in schema.items():
        full, text = f"{prefix}{key}", raw.get(key) if isinstance(raw, dict) else None
        if isinstance(kind, dict):
            _check_interpolations(cfg, kind, text, f"{full}.")
            continue
        if not isinstance(text, str) or "${" not in text:
            continue
        refs = _REFERENCE.findall(text)
        if len(refs) == 1 and text == f"${{{refs[0]}}}":  # the whole value: a null passes as null, typed by OmegaConf
            value = OmegaConf.select(cfg, refs[0])
            if kind == "bool" and value is not None and not isinstance(value, bool):
                raise ConfigError(f"config key {full!r}={text} resolves to {value!r}: it must be true or false")
            continue
        for ref in refs:
            if OmegaConf.select(cfg, ref, default=0) is None:
                raise ConfigError(
                    f"config key {full!r}={text!r} names {ref}, which is null here, so it would read "
                    f"{text.replace(f'${{{ref}}}', 'None')!r}; give {ref} a value (e.g. {ref}=DIR) or write {full} "
                    "out in full")
