"""What is wrong with a file handed to ``torch.load`` (`torch_file_problem`), told from its first
bytes before torch's reader, whose errors named nothing to act on: `lowbit formats --tensor` and a
model folder's ``pytorch_model.bin`` (`lowbit.models.pretrained.check_pytorch_bin`) say the same."""

from __future__ import annotations

from pathlib import Path

import torch


def torch_file_problem(file: Path, fix: str) -> str | None:
    """Why ``file``, by its first bytes (a zip archive's by its entries), is no file torch.load
    reads, with ``fix`` or its own; None for a zip archive with its directory (torch.save's
    format; not TorchScript's, nor numpy's .npz, whose torch.load errors were a page long) or a
    pickle that starts as torch's legacy format does (its magic number,
    ``torch.serialization.MAGIC_NUMBER``), either pickled with a protocol torch's safe unpickler
    reads (2 or 3), and for a file it cannot open (torch.load names the OSError, as before).
    torch.load's own reasons named nothing to act on: a text file was "(101)", a plain pickle
    "(Unsupported operand 149)" under a warning about pickle protocols, an empty file
    "(EOFError)", a torch file cut short "([Errno 22] Invalid argument)"."""
    import zipfile

    try:
        with open(file, "rb") as stream:
            head = stream.read(512)
    except OSError:  # not readable (permissions, I/O): torch.load's own error says so
        return None
    magic = torch.serialization.MAGIC_NUMBER
    # torch's legacy format: its magic number, pickled with the file's protocol: from protocol 2
    # on as LONG1 of 10 bytes (behind a FRAME opcode from protocol 4 on), before as LONG's text
    if head.startswith(b"\x80") and b"\x8a\x0a" + magic.to_bytes(10, "little") in head[:24]:
        protocol = head[1]
    elif head.startswith(b"L%dL\n." % magic):  # then the format's version: INT text only in 0
        protocol = 0 if head[len(b"L%dL\n." % magic) :].startswith(b"I") else 1
    else:
        protocol = None
    if protocol is not None:
        return None if protocol in (2, 3) else _protocol_problem("torch's legacy format", protocol)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(file) as archive:  # reads the directory at the end
                entries = archive.namelist()
                pickles = [entry for entry in entries if entry.endswith("/data.pkl")]
                pickled = archive.read(pickles[0])[:2] if pickles else b""
        except (zipfile.BadZipFile, OSError):
            return (
                "a zip archive without the directory at its end: cut short (an interrupted save "
                "or copy); fix: save or copy it again"
            )
        if any(entry.endswith("/constants.pkl") for entry in entries):  # torch's own test
            what = (
                "a TorchScript archive: torch.save(torch.jit.load(path).state_dict(), 'x.pt') "
                "saves its weights"
            )
        elif entries and all(entry.endswith(".npy") for entry in entries):
            what = (
                "a numpy .npz archive: torch.save({k: torch.from_numpy(v) for k, v in "
                "numpy.load(path).items()}, 'x.pt') saves it"
            )
        elif pickles and not pickled.startswith((b"\x80\x02", b"\x80\x03")):  # pickle_protocol
            # protocols 0 and 1 have no PROTO opcode to say which
            protocol = pickled[1] if pickled.startswith(b"\x80") else "0 or 1"
            return _protocol_problem("a torch zip archive", protocol)
        else:
            return None
    elif not head:
        what = "an empty file"
    elif head.startswith(b"\x80"):  # pickle protocol 2 or later
        what = "a plain pickle"
    elif head.startswith(b"\x93NUMPY"):
        what = "a numpy .npy file: torch.save(torch.from_numpy(numpy.load(path)), 'x.pt') saves it"
    elif head[5:8] == b"\0\0\0" and head[8:10] == b'{"':  # safetensors: a header length
        # (8 bytes, little-endian, far below 2**40), then its JSON
        what = f"a safetensors file: name it {file.with_suffix('.safetensors').name}"
    elif b"\x00" not in head and _is_text(head):
        what = "a text file"
    else:
        what = "neither a zip archive nor a pickle"
    return f"not a file torch.save wrote ({what}); {fix}"


def _protocol_problem(what: str, protocol: int | str) -> str:
    """The problem of a torch file, ``what``, pickled with a ``protocol`` other than the 2 and 3
    torch's safe unpickler reads (torch.load's reason was "Unsupported operand 149", protocol 4's
    FRAME, or an opcode of protocol 0's or 1's, such as 76, LONG)."""
    return (
        f"{what} pickled with protocol {protocol}, which a safe load (weights_only) does not "
        "read (it reads protocols 2 and 3); fix: if you trust the file, save it again, "
        "torch.save(torch.load(path, weights_only=False), 'x.pt')"
    )


def _is_text(head: bytes) -> bool:
    """Whether ``head``, a file's first bytes, is UTF-8 (its last character may be cut)."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3
    return True
