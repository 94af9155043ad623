"""Gramine packaging of the verifier (the original AFTUNE ran its verifier under gramine-sgx; docs/threats.md):
a manifest template for `aftune attestation verify-run` inside an SGX enclave, and a reader for
the SIGSTRUCT that `gramine-sgx-sign` writes, to report MRENCLAVE and MRSIGNER.

    aftune attestation gramine-manifest --out aftune-verify.manifest.template
    gramine-manifest -Dlog_level=error -Darch_libdir=/lib/x86_64-linux-gnu \\
        aftune-verify.manifest.template aftune-verify.manifest
    gramine-sgx-sign --manifest aftune-verify.manifest --output aftune-verify.manifest.sgx
    aftune attestation sigstruct aftune-verify.sig        # MRENCLAVE, MRSIGNER for clients
    gramine-sgx aftune-verify                              # reads job/, writes job/out/

The template is valid TOML as written (Jinja appears only inside strings), for Gramine 1.8+. It
is job-independent, so one MRENCLAVE serves every run: the job travels through `job/` in the
working directory (`job/run` the run directory, `job/provider.pub`, `job/nonce.hex`, the client's
`job/agreement.json`; output `job/out/attested-verdict.json`), mounted untrusted and allowed,
because the verifier checks the record against its signatures and the agreement itself, and the
attested verdict names the run and the agreement (by digest) it checked. Trusted:
the Gramine runtime, the interpreter and its libraries (hashed by gramine-sgx-sign), and every file
of the aftune package with its SHA-256 written here.

SIGSTRUCT (Intel SDM vol. 3D 38.13, 1808 bytes, little-endian): header 0..128 (HEADER1 at 0,
vendor u32 at 16, date BCD u32 at 20, HEADER2 at 24), modulus (384) at 128, exponent u32 at
512, signature (384) at 516, body 900..1028 (miscselect u32 900, miscmask u32 904, attributes
u64 928, xfrm u64 936, attribute mask 944..960, ENCLAVEHASH (MRENCLAVE) 960..992, ISVPRODID u16
1024, ISVSVN u16 1026), Q1 at 1040, Q2 at 1424. The RSA-3072 (e = 3) PKCS#1 v1.5 SHA-256
signature covers header || body; MRSIGNER = SHA-256 of the modulus as stored.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .binding import package_dir
from .claims import AttestationFailure

SIGSTRUCT_SIZE = 1808
HEADER1 = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")
JOB_DIR = "/aftune/job"
DEFAULT_ARGV = ("python3", "-m", "aftune", "attestation", "verify-run", f"{JOB_DIR}/run",
                "--public-key", f"{JOB_DIR}/provider.pub", "--nonce-file", f"{JOB_DIR}/nonce.hex",
                "--agreement", f"{JOB_DIR}/agreement.json",
                "--provider", "gramine", "--out", f"{JOB_DIR}/out/attested-verdict.json")


@dataclass(frozen=True)
class ManifestSettings:
    enclave_size: str = "16G"  # torch and a model must fit: the enclave is sized once, at signing
    max_threads: int = 32  # threads the enclave may create (torch's pool + Python's)
    argv: tuple[str, ...] = DEFAULT_ARGV  # fixed: argv from the untrusted host is not used
    omp_threads: int = 8


def _toml(s: str) -> str:
    return json.dumps(s)  # a TOML basic string: JSON's escapes are a subset TOML accepts


def _libpython_dir() -> str | None:
    """The directory of a shared libpython the interpreter links against (pyenv, conda), if any."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED") and any(Path(libdir).glob("libpython*.so*")):
        return str(Path(libdir).resolve())
    return None


def _python_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    found = {str(Path(paths[k]).resolve()) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs = sorted(found | ({_libpython_dir()} if _libpython_dir() else set()))
    return [d for d in dirs if Path(d).is_dir() and not any(d != o and d.startswith(o + "/") for o in dirs)]


def package_file_hashes(root: Path | None = None) -> dict[str, str]:
    """{absolute path: sha256 hex} of every file of the aftune package (no __pycache__)."""
    base = root or package_dir()
    files = sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def manifest_template(settings: ManifestSettings = ManifestSettings(), python: str | None = None) -> str:
    """The manifest template text (TOML with Jinja variables inside strings only)."""
    if settings.max_threads < 4 or not settings.enclave_size[:-1].isdigit() or settings.enclave_size[-1] not in "MG":
        raise InputError("enclave size looks like '16G' or '512M' and the enclave needs at least 4 threads")
    interpreter = str(Path(python or sys.executable).resolve())
    pkg = package_dir()
    pythonpath = str(pkg.parent)
    dirs = _python_dirs()
    # a source checkout (editable install) is mounted and each of its files pinned here; an
    # installed package is inside a Python directory, which gramine-sgx-sign hashes file by file
    checkout = not any(str(pkg).startswith(d + "/") for d in dirs)
    pinned = package_file_hashes(pkg) if checkout else {}
    mounts = [("/lib", "file:{{ gramine.runtimedir() }}"), ("{{ arch_libdir }}", "file:{{ arch_libdir }}"),
              ("/usr{{ arch_libdir }}", "file:/usr{{ arch_libdir }}"), (interpreter, f"file:{interpreter}")]
    mounts += [(d, f"file:{d}") for d in dirs] + ([(str(pkg), f"file:{pkg}")] if checkout else [])
    mounts.append((JOB_DIR, "file:job"))
    lines = [
        "# aftune verifier for Gramine (SGX). Written by `aftune attestation gramine-manifest`; see docs/tee.md.",
        "# Job-independent: the run, provider key, nonce and agreement come through job/ (untrusted, checked",
        "# by the verifier); the attested verdict goes to job/out/. Every aftune file is pinned by SHA-256.",
        f"libos.entrypoint = {_toml(interpreter)}",
        'loader.entrypoint.uri = "file:{{ gramine.libos }}"',
        'loader.log_level = "{{ log_level }}"',
        f"loader.argv = [{', '.join(_toml(a) for a in settings.argv)}]",
        'loader.env.LD_LIBRARY_PATH = "/lib:{{ arch_libdir }}:/usr{{ arch_libdir }}' + (f':{_libpython_dir()}"' if _libpython_dir() else '"'),
        *([f"loader.env.PYTHONPATH = {_toml(pythonpath)}"] if checkout else []),
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
        f'loader.env.OMP_NUM_THREADS = "{settings.omp_threads}"',
        'loader.env.HF_HUB_OFFLINE = "1"',
        f'loader.env.HOME = "{JOB_DIR}"',
        "fs.mounts = [",
        *[f"  {{ path = {_toml(p)}, uri = {_toml(u)} }}," for p, u in mounts],
        '  { type = "tmpfs", path = "/tmp" },',
        "]",
        f"sgx.enclave_size = {_toml(settings.enclave_size)}",
        f"sgx.max_threads = {settings.max_threads}",
        "sgx.debug = false",
        "sgx.edmm_enable = false",
        'sgx.remote_attestation = "dcap"',
        "sgx.trusted_files = [",
        '  "file:{{ gramine.libos }}",',
        '  "file:{{ gramine.runtimedir() }}/",',
        '  "file:{{ arch_libdir }}/",',
        '  "file:/usr{{ arch_libdir }}/",',
        f"  {_toml('file:' + interpreter)},",
        *[f"  {_toml('file:' + d + '/')}," for d in dirs],
        *[f"  {{ uri = {_toml('file:' + path)}, sha256 = {_toml(digest)} }}," for path, digest in pinned.items()],
        "]",
        'sgx.allowed_files = [ "file:job/" ]',
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Sigstruct:
    """The fields of a SIGSTRUCT a client needs, after its signature checked out."""

    vendor: int
    date: str
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: int
    xfrm: int
    miscselect: int

    @property
    def debug(self) -> bool:
        return bool(self.attributes & 0x02)

    def to_json(self) -> dict[str, object]:
        return {"mrenclave": self.mrenclave.hex(), "mrsigner": self.mrsigner.hex(), "isv_prod_id": self.isv_prod_id,
                "isv_svn": self.isv_svn, "debug": self.debug, "attributes": f"{self.attributes:#018x}",
                "xfrm": f"{self.xfrm:#018x}", "miscselect": f"{self.miscselect:#010x}", "vendor": f"{self.vendor:#06x}",
                "date": self.date}


def read_sigstruct(data: bytes) -> Sigstruct:
    """Parse a SIGSTRUCT (`gramine-sgx-sign`'s .sig file) and verify its RSA signature; raises
    AttestationFailure(format | signature) naming what is wrong."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if len(data) != SIGSTRUCT_SIZE:
        raise AttestationFailure("format", f"a SIGSTRUCT has {SIGSTRUCT_SIZE} bytes, got {len(data)}")
    if data[0:16] != HEADER1 or data[24:40] != HEADER2:
        raise AttestationFailure("format", "the SIGSTRUCT headers are not the architectural constants")
    vendor, date = struct.unpack_from("<II", data, 16)
    modulus, (exponent,), signature = data[128:512], struct.unpack_from("<I", data, 512), data[516:900]
    n, s = int.from_bytes(modulus, "little"), int.from_bytes(signature, "little")
    if exponent != 3 or n.bit_length() != 3072 or not 0 < s < n:
        raise AttestationFailure("format", f"the signing key is not RSA-3072 with exponent 3 (exponent {exponent}, "
                                           f"{n.bit_length()} bits)")
    try:
        rsa.RSAPublicNumbers(exponent, n).public_key().verify(
            s.to_bytes(384, "big"), data[0:128] + data[900:1028], padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise AttestationFailure("signature", "the SIGSTRUCT signature does not verify under its modulus: the "
                                              "enclave measurement or attributes were edited after signing") from None
    q1, q2 = int.from_bytes(data[1040:1424], "little"), int.from_bytes(data[1424:1808], "little")
    if q1 != s * s // n or q2 != (s * s * s - q1 * s * n) // n:
        raise AttestationFailure("format", "Q1/Q2 do not match the signature (EINIT would refuse this SIGSTRUCT)")
    miscselect = struct.unpack_from("<I", data, 900)[0]
    attributes, xfrm = struct.unpack_from("<QQ", data, 928)
    isv_prod_id, isv_svn = struct.unpack_from("<HH", data, 1024)
    digits = f"{date:08x}"
    return Sigstruct(vendor, f"{digits[:4]}-{digits[4:6]}-{digits[6:]}", data[960:992], hashlib.sha256(modulus).digest(),
                     isv_prod_id, isv_svn, attributes, xfrm, miscselect)
