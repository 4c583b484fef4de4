"""Eureka's wire shapes, JSON and XML, both directions. Pure: no I/O, no busreg types.

The in-memory form is Eureka's JSON shape (what Netflix's ``EurekaJacksonCodec`` writes):

    {"instanceId": "10.0.0.7:orders:8080", "hostName": "h1", "app": "ORDERS",
     "ipAddr": "10.0.0.7", "status": "UP", "overriddenStatus": "UNKNOWN",
     "port": {"$": 8080, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
     "countryId": 1,
     "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                        "name": "MyOwn"},
     "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90, ...},
     "metadata": {"management.port": "8080"}, "homePageUrl": "...", "vipAddress": "orders",
     "isCoordinatingDiscoveryServer": "false", "lastUpdatedTimestamp": "17...",
     "lastDirtyTimestamp": "17...", "actionType": "ADDED"}

XML follows Netflix's XStream converters: ``<port enabled="true">8080</port>``,
``<dataCenterInfo class="...">``, ``<overriddenstatus>`` (lower-case s, as XStream writes it;
both spellings are read), ``<metadata class="java.util.Collections$EmptyMap"/>`` when empty,
and metadata keys as element names with XStream's name coding (``_`` → ``__``, ``$`` → ``_-``).
A metadata key that is no XML name even then is left out of XML answers (JSON has them all).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

__all__ = [
    "EMPTY_MAP_CLASS",
    "CodecError",
    "applications_doc",
    "decode_applications",
    "decode_instance",
    "encode",
    "reconcile_hashcode",
    "wants_json",
    "xml_name",
]

#: What Eureka writes for an empty metadata map (``@class`` in JSON, ``class`` in XML).
EMPTY_MAP_CLASS = "java.util.Collections$EmptyMap"

#: Eureka's status delimiter in ``apps__hashcode`` (Applications.STATUS_DELIMITER).
STATUS_DELIMITER = "_"

_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]*$")
#: Tags whose children form a list even when one is present.
_LISTS = {"application", "instance"}


class CodecError(ValueError):
    """A request body that is not a Eureka document (answered with 400)."""


# --- hashcode ---------------------------------------------------------------------------------


def reconcile_hashcode(statuses: Iterable[str]) -> str:
    """Eureka's ``apps__hashcode``: instance counts per status over the whole registry,
    statuses sorted, each as ``<STATUS>_<count>_`` (Applications.getReconcileHashCode).

    >>> reconcile_hashcode(["UP", "DOWN", "UP"])
    'DOWN_1_UP_2_'
    >>> reconcile_hashcode([])
    ''
    """
    counts = Counter(statuses)
    return "".join(
        f"{status}{STATUS_DELIMITER}{counts[status]}{STATUS_DELIMITER}" for status in sorted(counts)
    )


# --- documents --------------------------------------------------------------------------------


def applications_doc(
    apps: Iterable[tuple[str, list[dict[str, Any]]]], *, version: int, hashcode: str
) -> dict[str, Any]:
    """The ``applications`` document (JSON shape) of ``(APP NAME, [instance])`` pairs."""
    return {
        "versions__delta": str(version),
        "apps__hashcode": hashcode,
        "application": [{"name": name, "instance": list(items)} for name, items in apps],
    }


def wants_json(accept: str | None) -> bool:
    """Eureka's rule: JSON when the Accept header mentions json, else XML."""
    return accept is not None and "json" in accept.lower()


def encode(root: str, doc: dict[str, Any], *, as_json: bool) -> bytes:
    """``{root: doc}`` as JSON, or ``<root>`` as XML. ``root`` is ``applications``,
    ``application`` or ``instance``."""
    if as_json:
        return orjson.dumps({root: _json_ready(root, doc)})
    element = ET.Element(root)
    _xml_fill(element, root, doc)
    out: bytes = ET.tostring(element, encoding="utf-8")
    return out


def _json_ready(tag: str, value: Any) -> Any:
    """Eureka's JSON quirk: an empty metadata map is written as its Java class."""
    if isinstance(value, dict):
        if tag == "metadata" and not value:
            return {"@class": EMPTY_MAP_CLASS}
        return {k: _json_ready(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(tag, v) for v in value]
    return value


def xml_name(key: str) -> str | None:
    """XStream's element name for a map key (``_`` → ``__``, ``$`` → ``_-``), or None when
    the key cannot be an XML element name at all.

    >>> xml_name("management.port"), xml_name("a_b"), xml_name("1x")
    ('management.port', 'a__b', None)
    """
    coded = key.replace("_", "__").replace("$", "_-")
    return coded if _XML_NAME.match(coded) else None


def _key_of(name: str) -> str:
    """The inverse of ``xml_name``."""
    out: list[str] = []
    i = 0
    while i < len(name):
        pair = name[i : i + 2]
        if pair == "__":
            out.append("_")
            i += 2
        elif pair == "_-":
            out.append("$")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _xml_fill(element: ET.Element, tag: str, value: Any) -> None:
    if tag == "metadata" and isinstance(value, dict):
        if not value:
            element.set("class", EMPTY_MAP_CLASS)
        for key, item in value.items():
            name = xml_name(str(key))
            if name is not None:
                ET.SubElement(element, name).text = _text(item)
        return
    if not isinstance(value, dict):
        element.text = _text(value)
        return
    for key, item in value.items():
        if key.startswith("@"):
            element.set(key[1:], _text(item))
        elif key == "$":
            element.text = _text(item)
        elif isinstance(item, list):
            for entry in item:
                _xml_fill(ET.SubElement(element, key), key, entry)
        else:
            # XStream's converter writes the legacy lower-case spelling
            name = "overriddenstatus" if key == "overriddenStatus" else key
            _xml_fill(ET.SubElement(element, name), key, item)


# --- decoding ---------------------------------------------------------------------------------


def _parse_xml(body: bytes) -> ET.Element:
    # Entity declarations are the way to make a small XML body expand without bound; Eureka
    # documents never have a DTD, so one is refused outright.
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise CodecError("XML with a DOCTYPE or ENTITY declaration is not accepted")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise CodecError(f"not well-formed XML: {exc}") from exc


def _from_xml(element: ET.Element) -> Any:
    tag = element.tag
    children = list(element)
    if tag == "metadata":
        return {_key_of(child.tag): (child.text or "") for child in children}
    attrs = {f"@{k}": v for k, v in element.attrib.items()}
    if not children:
        text = (element.text or "").strip()
        return {**attrs, "$": text} if attrs else text
    out: dict[str, Any] = dict(attrs)
    for child in children:
        name = "overriddenStatus" if child.tag == "overriddenstatus" else child.tag
        value = _from_xml(child)
        if name in _LISTS:
            out.setdefault(name, []).append(value)
        elif name in out:
            # a repeated element that is not a known list: keep the first (as XStream would
            # overwrite, either choice is arbitrary; the first is what a reader saw first)
            continue
        else:
            out[name] = value
    return out


def _from_json(body: bytes, root: str) -> Any:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or root not in doc:
        raise CodecError(f'expected a JSON object {{"{root}": {{...}}}}')
    return doc[root]


def decode_instance(body: bytes, *, as_json: bool) -> dict[str, Any]:
    """An ``instance`` document (a registration) in Eureka's JSON shape; metadata without
    the ``@class`` marker. Values stay as sent (strings from XML): the caller validates."""
    if as_json:
        doc = _from_json(body, "instance")
    else:
        element = _parse_xml(body)
        if element.tag != "instance":
            raise CodecError(f"expected an <instance> document, got <{element.tag}>")
        doc = _from_xml(element)
    if not isinstance(doc, dict):
        raise CodecError("the instance must be an object")
    return _clean(doc)


def decode_applications(body: bytes, *, as_json: bool) -> dict[str, Any]:
    """An ``applications`` document: ``{"versions__delta", "apps__hashcode",
    "application": [{"name", "instance": [...]}]}`` with lists even for one entry."""
    if as_json:
        doc = _from_json(body, "applications")
    else:
        element = _parse_xml(body)
        if element.tag != "applications":
            raise CodecError(f"expected an <applications> document, got <{element.tag}>")
        doc = _from_xml(element) or {}
        if isinstance(doc, str):  # <applications/> with no children at all
            doc = {}
    if not isinstance(doc, dict):
        raise CodecError("applications must be an object")
    apps = _as_list(doc.get("application"))
    return {
        "versions__delta": str(doc.get("versions__delta", "")),
        "apps__hashcode": str(doc.get("apps__hashcode", "")),
        "application": [
            {
                "name": app.get("name", ""),
                "instance": [_clean(i) for i in _as_list(app.get("instance"))],
            }
            for app in apps
            if isinstance(app, dict)
        ],
    }


def _as_list(value: Any) -> list[Any]:
    # Eureka's older JSON (Jettison) writes a single entry as an object, not a list
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _clean(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    if "overriddenstatus" in out and "overriddenStatus" not in out:
        out["overriddenStatus"] = out.pop("overriddenstatus")
    metadata = out.get("metadata")
    if isinstance(metadata, dict):
        out["metadata"] = {k: v for k, v in metadata.items() if k != "@class"}
    elif metadata == "":  # <metadata class="..."/> read from XML without the attribute
        out["metadata"] = {}
    return out
