"""The training decode step (``decode_batch``) on this machine's device against the host's Pillow
decode, for the files a user's folder may hold.

    python benchmarks/decode_check.py [--damaged 200]

On CUDA the JPEGs go to nvJPEG in one batched call; other formats, and a batch that call refuses,
are decoded on the host as the Pillow path decodes them. Prints one JSON object:
- ``formats``: each sample format's largest difference from the host's pixels (0 for the formats
  decoded on the host; a JPEG decoded by nvJPEG may differ by a few levels);
- ``damaged``: of the damaged JPEGs that Pillow reads whole, how many the device's decoder refused
  alone (each then decoded on the host: ``refused_as_host`` says whether to the bit);
- ``cut_named``: whether a JPEG cut short is an error that names its file.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import decode_image as pil_decode
from clfpipe.demo_data import damaged_jpegs, write_format_samples
from clfpipe.nn.transforms import decode_batch, host_decode


class _Refusals(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "that the host decodes" in record.getMessage()


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def formats(device: torch.device, folder: Path) -> dict[str, int]:
    files = write_format_samples(folder)
    decoded = decode_batch([_encoded(f.read_bytes()) for f in files], device, names=files)
    return {f.name: int((img.cpu().int() - host_decode(_encoded(f.read_bytes())).int()).abs().max())
            for f, img in zip(files, decoded)}


def damaged(device: torch.device, count: int) -> dict:
    """Each damaged JPEG that Pillow reads, through the decode step alone: refused ones counted."""
    readable = []
    for data in damaged_jpegs(count):
        try:
            pil_decode(data)
            readable.append(data)
        except ValueError:
            pass
    refusals = _Refusals()
    logging.getLogger("clfpipe.nn.transforms").addHandler(refusals)
    as_host = True
    for data in readable:
        before = refusals.count
        img = decode_batch([_encoded(data)], device)[0].cpu()
        if refusals.count > before:
            as_host = as_host and torch.equal(img, host_decode(_encoded(data)))
    return {"tried": len(readable), "refused": refusals.count, "refused_as_host": as_host}


def cut_named(device: torch.device, folder: Path) -> bool:
    whole = (folder / "rgb.jpg").read_bytes()
    cut = folder / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    try:
        decode_batch([_encoded(whole), _encoded(cut.read_bytes())], device, names=[folder / "rgb.jpg", cut])
    except DataError as exc:
        return str(exc).startswith(f"corrupt image file {cut}: ")
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damaged", type=int, default=200, help="damaged JPEGs to try")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = {"check": "decode", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "formats": formats(device, folder), "damaged": damaged(device, args.damaged),
                  "cut_named": cut_named(device, folder)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
