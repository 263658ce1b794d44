"""A :class:`VerifyResult` as JUnit XML, for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from acnet_convert.verify.results import VerifyResult

__all__ = [
    "junit_error_xml",
    "junit_xml",
]


def junit_xml(result: VerifyResult) -> str:
    """The result as JUnit XML: one testcase per check, failures carrying the numbers."""
    checks = result.checks()
    failed = sum(not c.passed for c in checks)
    suite = _suite(result.fused, len(checks), failed, 0, result.seconds)
    props = ET.SubElement(suite, "properties")
    for key in (
        "train",
        "fused",
        "mode",
        "arch",
        "model",
        "layout",
        "device",
        "dtype",
        "rtol",
        "atol",
        "seed",
        "batch",
        "input",
    ):
        value = getattr(result, key)
        if value is not None:
            ET.SubElement(props, "property", name=key, value=str(value))
    classname = f"acnet-convert.verify.{Path(result.fused).name}"
    for case in result.checks():
        element = ET.SubElement(
            suite, "testcase", classname=classname, name=case.name, time=f"{case.seconds:.4f}"
        )
        if case.passed:
            ET.SubElement(element, "system-out").text = case.numbers()
            continue
        text = case.numbers()
        culprits = [c for c in result.block_checks if not c.passed]
        if case.kind != "block" and culprits:
            text += "\nchecked on their own, these differ:\n" + "\n".join(
                f"  {c.name}: {c.numbers()}" for c in culprits
            )
        failure = ET.SubElement(
            element, "failure", message=case.numbers(), type="VerificationError"
        )
        failure.text = text
    return _serialise(suite)


def junit_error_xml(train: str, fused: str, message: str) -> str:
    """JUnit XML for a run that could not compare at all (unusable input, bad options)."""
    suite = _suite(fused, 1, 0, 1, 0.0)
    element = ET.SubElement(
        suite,
        "testcase",
        classname=f"acnet-convert.verify.{Path(fused).name}",
        name=f"{train} -> {fused}",
        time="0",
    )
    error = ET.SubElement(element, "error", message=message, type="ACNetConvertError")
    error.text = message
    return _serialise(suite)


def _suite(fused: str, tests: int, failures: int, errors: int, seconds: float) -> ET.Element:
    root = ET.Element("testsuites", name="acnet-convert verify")
    return ET.SubElement(
        root,
        "testsuite",
        name=f"acnet-convert verify {Path(fused).name}",
        tests=str(tests),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
        time=f"{seconds:.4f}",
    )


def _serialise(suite: ET.Element) -> str:
    root = ET.Element("testsuites", name="acnet-convert verify")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
