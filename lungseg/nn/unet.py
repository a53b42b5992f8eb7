"""The Buda et al. brain-MRI U-Net, with a state dict that matches the published weights.

Torch is imported here; only ``lungseg.train`` and ``lungseg.export`` import this module.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUB_REPO = "mateuszbuda/brain-segmentation-pytorch"
HUB_WEIGHTS_FILE = "unet-e012d006.pt"
HUB_WEIGHTS_URL = (
    "https://github.com/mateuszbuda/brain-segmentation-pytorch/releases/download/v1.0/"
    + HUB_WEIGHTS_FILE
)


class DonorUnavailableError(RuntimeError):
    """The donor weights could not be obtained (offline, missing or corrupt file)."""


def _block(in_channels: int, features: int, name: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                (f"{name}conv1", nn.Conv2d(in_channels, features, 3, padding=1, bias=False)),
                (f"{name}norm1", nn.BatchNorm2d(features)),
                (f"{name}relu1", nn.ReLU(inplace=True)),
                (f"{name}conv2", nn.Conv2d(features, features, 3, padding=1, bias=False)),
                (f"{name}norm2", nn.BatchNorm2d(features)),
                (f"{name}relu2", nn.ReLU(inplace=True)),
            ]
        )
    )


class UNet(nn.Module):
    """U-Net of Buda et al. (2019); ``forward`` returns sigmoid probabilities."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, init_features: int = 32):
        super().__init__()
        f = init_features
        self.encoder1 = _block(in_channels, f, "enc1")
        self.pool1 = nn.MaxPool2d(2, 2)
        self.encoder2 = _block(f, f * 2, "enc2")
        self.pool2 = nn.MaxPool2d(2, 2)
        self.encoder3 = _block(f * 2, f * 4, "enc3")
        self.pool3 = nn.MaxPool2d(2, 2)
        self.encoder4 = _block(f * 4, f * 8, "enc4")
        self.pool4 = nn.MaxPool2d(2, 2)
        self.bottleneck = _block(f * 8, f * 16, "bottleneck")
        self.upconv4 = nn.ConvTranspose2d(f * 16, f * 8, 2, stride=2)
        self.decoder4 = _block(f * 16, f * 8, "dec4")
        self.upconv3 = nn.ConvTranspose2d(f * 8, f * 4, 2, stride=2)
        self.decoder3 = _block(f * 8, f * 4, "dec3")
        self.upconv2 = nn.ConvTranspose2d(f * 4, f * 2, 2, stride=2)
        self.decoder2 = _block(f * 4, f * 2, "dec2")
        self.upconv1 = nn.ConvTranspose2d(f * 2, f, 2, stride=2)
        self.decoder1 = _block(f * 2, f, "dec1")
        self.conv = nn.Conv2d(f, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.pool1(enc1))
        enc3 = self.encoder3(self.pool2(enc2))
        enc4 = self.encoder4(self.pool3(enc3))
        bottleneck = self.bottleneck(self.pool4(enc4))
        dec4 = self.decoder4(torch.cat((self.upconv4(bottleneck), enc4), dim=1))
        dec3 = self.decoder3(torch.cat((self.upconv3(dec4), enc3), dim=1))
        dec2 = self.decoder2(torch.cat((self.upconv2(dec3), enc2), dim=1))
        dec1 = self.decoder1(torch.cat((self.upconv1(dec2), enc1), dim=1))
        return torch.sigmoid(self.conv(dec1))


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DonorUnavailableError(f"{path}: donor weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DonorUnavailableError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a lungseg training checkpoint
    if not isinstance(obj, dict):
        raise DonorUnavailableError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_donor(source: str | Path) -> UNet:
    """Build the stage-0 model.

    ``source`` is ``"hub"`` (torch.hub, needs internet), ``"scratch"`` (random
    initialisation) or the path of a local weights file such as ``unet-e012d006.pt``.
    """
    model = UNet()
    if str(source) == "scratch":
        log.info("donor: scratch (random initialisation, no MRI pretraining)")
        return model
    if str(source) == "hub":
        try:
            hub_model = torch.hub.load(
                HUB_REPO, "unet", in_channels=3, out_channels=1, init_features=32,
                pretrained=True, trust_repo=True,
            )
        except Exception as exc:
            raise DonorUnavailableError(
                f"could not fetch the donor from torch.hub ({HUB_REPO}): {exc}. Offline? "
                f"Download {HUB_WEIGHTS_FILE} ({HUB_WEIGHTS_URL}) on a connected machine "
                "and pass its path instead of 'hub'."
            ) from exc
        model.load_state_dict(hub_model.state_dict(), strict=True)
        log.info("donor: %s from torch.hub", HUB_REPO)
        return model
    path = Path(source)
    model.load_state_dict(_state_dict_from_file(path), strict=True)
    log.info("donor: weights from %s", path)
    return model
