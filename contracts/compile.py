#!/usr/bin/env python3
"""Compile contracts/MicroteLedger.sol into contracts/MicroteLedger.json (abi + bytecode).

Reproducible: a pinned solc from the npm registry (solcjs, run by `npx`), fixed standard-JSON
settings, and the source's sha256 kept in the artifact. The artifact is committed, so neither
microte nor CI needs Node.js; only changing the contract does.

    python3 contracts/compile.py          # rewrite the artifact
    python3 contracts/compile.py --check  # recompile and fail if the artifact differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

SOLC_VERSION = "0.8.28"  # npm package `solc` (solcjs), pinned
HERE = Path(__file__).resolve().parent
SOURCE = HERE / "MicroteLedger.sol"
ARTIFACT = HERE / "MicroteLedger.json"
CONTRACT = "MicroteLedger"
SETTINGS = {
    "optimizer": {"enabled": True, "runs": 200},
    # london: no PUSH0/MCOPY, so the bytecode runs on older EVM chains (and every newer one).
    "evmVersion": "london",
    "metadata": {"bytecodeHash": "none"},  # no IPFS hash of the metadata in the bytecode
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


def compile_artifact() -> dict[str, object]:
    npx = shutil.which("npx")
    if npx is None:
        raise SystemExit("compile.py needs npx (Node.js and npm) to run solc from the npm registry")
    source = SOURCE.read_text()
    standard_input = {
        "language": "Solidity",
        "sources": {SOURCE.name: {"content": source}},
        "settings": SETTINGS,
    }
    proc = subprocess.run(
        [npx, "--yes", f"solc@{SOLC_VERSION}", "--standard-json"],
        input=json.dumps(standard_input),
        capture_output=True,
        text=True,
        check=True,
    )
    # npx may print notices before solc's JSON: take the JSON object.
    output = json.loads(proc.stdout[proc.stdout.index("{") :])
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    for e in output.get("errors", []):
        print(e.get("formattedMessage", e.get("message")), file=sys.stderr)
    if errors:
        raise SystemExit("solc reported errors")
    compiled = output["contracts"][SOURCE.name][CONTRACT]
    return {
        "contractName": CONTRACT,
        "compiler": {"package": f"solc@{SOLC_VERSION}", "settings": SETTINGS},
        "sourceSha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": compiled["abi"],
        "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if the committed artifact differs")
    args = p.parse_args()
    text = json.dumps(compile_artifact(), indent=1) + "\n"
    if args.check:
        if not ARTIFACT.exists() or ARTIFACT.read_text() != text:
            print(f"{ARTIFACT.name} is not the output of {SOURCE.name}: run contracts/compile.py", file=sys.stderr)
            return 1
        print(f"{ARTIFACT.name} is up to date")
        return 0
    ARTIFACT.write_text(text)
    print(f"wrote {ARTIFACT.relative_to(HERE.parent)} (solc {SOLC_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
