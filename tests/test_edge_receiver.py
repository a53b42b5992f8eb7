"""The DICOM Storage SCP: CR/DX in (atomically, into the watch folder), everything else refused with a status."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from edge_helpers import DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE, associate, make_cr

UID = "1.2.826.0.1.3680043.10.1082.55."
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def structured_report(sop_uid: str):
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = UID + "80", UID + "81", "SR"
    return ds


def as_class(ds, sop_class: str):
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = {"1.2.840.10008.5.1.4.1.1.1": "CR", CT_IMAGE_STORAGE: "CT"}.get(sop_class, "DX")
    return ds


@pytest.fixture
def receiver(tmp_path: Path):
    from lungseg.edge_runtime.receiver import StorageReceiver

    folder = tmp_path / "watch"
    folder.mkdir()
    scp = StorageReceiver(folder, 0, "LUNGSEG", "127.0.0.1", ["PORTABLE1", "PORTABLE2"])
    _, port = scp.start()
    scp.port = port
    yield scp
    scp.stop()


@pytest.mark.integration
def test_cr_and_dx_are_stored_atomically_and_other_classes_refused(receiver) -> None:
    from pydicom import dcmread
    from watchdog.events import (
        FileClosedEvent,
        FileCreatedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    events: list[tuple[str, str]] = []

    class Recorder(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            if isinstance(event, FileMovedEvent):
                events.append(("moved_to", Path(event.dest_path).name))
            elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileClosedEvent)):
                events.append(("written", Path(event.src_path).name))

    observer = Observer()
    observer.schedule(Recorder(), str(receiver.folder))
    observer.start()
    sent = [make_cr(UID + "1", size=96), as_class(make_cr(UID + "2", size=96, index=1), DX_PRESENTATION_STORAGE),
            as_class(make_cr(UID + "3", size=96, index=2), DX_PROCESSING_STORAGE)]
    report, ct = structured_report(UID + "4"), as_class(make_cr(UID + "5", size=64), CT_IMAGE_STORAGE)
    assoc = associate(receiver.port, classes=["1.2.840.10008.5.1.4.1.1.1", DX_PRESENTATION_STORAGE,
                                              DX_PROCESSING_STORAGE, BASIC_TEXT_SR, CT_IMAGE_STORAGE,
                                              "1.2.840.10008.5.1.4.1.1.2.1.99"])  # not a storage class at all
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [*sent, report, ct]]
        rejected = {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts}
    finally:
        assoc.release()
    observer.stop()
    observer.join(5)
    # CR, DX for presentation, DX for processing stored; the SR and the CT refused: SOP class not supported
    assert statuses == [0x0000, 0x0000, 0x0000, 0x0122, 0x0122]
    assert rejected == {"1.2.840.10008.5.1.4.1.1.2.1.99": 0x03}  # abstract syntax not supported
    names = sorted(p.name for p in receiver.folder.iterdir())
    assert names == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in sent)  # no temp file left behind
    for ds in sent:
        got = dcmread(receiver.folder / f"{ds.SOPInstanceUID}.dcm")
        assert got.SOPClassUID == ds.SOPClassUID and got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got.PixelData == ds.PixelData
    # a final name only ever appeared by a rename: never created or written under its visible name
    finals = {f"{ds.SOPInstanceUID}.dcm" for ds in sent}
    assert {name for kind, name in events if kind == "moved_to"} == finals
    assert not [name for kind, name in events if kind == "written" and not name.startswith(".")]


@pytest.mark.integration
def test_calling_ae_not_allowed_and_wrong_called_ae_are_rejected(receiver) -> None:
    stranger = associate(receiver.port, calling="INTRUDER", classes=["1.2.840.10008.5.1.4.1.1.1"])
    assert stranger.is_rejected and not stranger.is_established
    misdialled = associate(receiver.port, called="OTHERNODE", classes=["1.2.840.10008.5.1.4.1.1.1"])
    assert misdialled.is_rejected
    allowed = associate(receiver.port, calling="PORTABLE2", classes=["1.2.840.10008.1.1"])
    assert allowed.is_established
    try:
        assert int(allowed.send_c_echo().Status) == 0x0000
    finally:
        allowed.release()
    assert list(receiver.folder.iterdir()) == []


@pytest.mark.integration
def test_a_write_failure_answers_out_of_resources(receiver) -> None:
    assert receiver.problem() is None
    shutil.rmtree(receiver.folder)  # the folder vanished (unmounted disk): the image must not be acknowledged
    assoc = associate(receiver.port, classes=["1.2.840.10008.5.1.4.1.1.1"])
    try:
        status = int(assoc.send_c_store(make_cr(UID + "9", size=64)).Status)
    finally:
        assoc.release()
    assert status == 0xA700
    assert receiver.problem() == "receiver_refusing: stores refused (write_failed)"  # what /healthz reports
    receiver.folder.mkdir()  # the disk is back: the next store succeeds and the problem clears
    assoc = associate(receiver.port, classes=["1.2.840.10008.5.1.4.1.1.1"])
    try:
        assert int(assoc.send_c_store(make_cr(UID + "9", size=64)).Status) == 0x0000
    finally:
        assoc.release()
    assert receiver.problem() is None


@pytest.mark.integration
def test_concurrent_senders_of_the_same_instance_leave_one_complete_file(receiver) -> None:
    from pydicom import dcmread

    ds = make_cr(UID + "7", size=128)
    statuses: list[int] = []

    def send() -> None:
        assoc = associate(receiver.port, classes=["1.2.840.10008.5.1.4.1.1.1"])
        try:
            statuses.extend(int(assoc.send_c_store(ds).Status) for _ in range(3))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [0] * 9
    assert [p.name for p in receiver.folder.iterdir()] == [f"{UID}7.dcm"]
    assert dcmread(receiver.folder / f"{UID}7.dcm").PixelData == ds.PixelData


def test_scp_settings_from_file_and_flags(tmp_path: Path) -> None:
    from lungseg.edge_runtime.cli import build_parser, config_from_args
    from lungseg.edge_runtime.config import ConfigError, EdgeConfig

    config_file = tmp_path / "edge.toml"
    config_file.write_text('watch = "w"\nout = "o"\nscp_port = 11112\nscp_ae = "LUNGSEG1"\n'
                           'scp_allow = ["PORTABLE1", "PORTABLE2"]\nmetrics_port = 9464\n')
    config = config_from_args(build_parser().parse_args(["run", "--config", str(config_file)]))
    assert (config.scp_port, config.scp_ae, config.scp_bind, config.scp_allow) == (
        11112, "LUNGSEG1", "127.0.0.1", ["PORTABLE1", "PORTABLE2"])
    assert (config.metrics_port, config.metrics_bind) == (9464, "127.0.0.1")
    args = build_parser().parse_args(["run", "--config", str(config_file), "--scp-allow",
                                      "UNIT7@192.0.2.7, UNIT8@192.0.2.8:4006", "--scp-bind", "0.0.0.0",
                                      "--scp-port", "104"])
    config = config_from_args(args)
    assert (config.scp_port, config.scp_bind, config.scp_allow) == (104, "0.0.0.0",
                                                                    ["UNIT7@192.0.2.7", "UNIT8@192.0.2.8:4006"])
    with pytest.raises(ConfigError, match="once"):
        EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_port=11112, once=True).validate()
    with pytest.raises(ConfigError, match="1-16"):
        EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_allow=["A" * 17]).validate()


def test_a_network_receiver_needs_a_modality_list_that_names_hosts(tmp_path: Path) -> None:
    """Bound to the network, the receiver needs every sender as AET@host, or scp_accept_any; loopback needs none."""
    from lungseg.edge_runtime.config import ConfigError, EdgeConfig

    def config(**settings):
        return EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_port=104, **settings).validate()

    with pytest.raises(ConfigError, match="no modality list"):
        config(scp_bind="0.0.0.0")
    with pytest.raises(ConfigError, match="names no host for UNIT8"):
        config(scp_bind="0.0.0.0", scp_allow=["UNIT7@192.0.2.7", "UNIT8"])
    with pytest.raises(ConfigError, match="not a TCP port"):
        config(scp_bind="0.0.0.0", scp_allow=["UNIT7@192.0.2.7:99999"])
    with pytest.raises(ConfigError, match="AE title"):
        config(scp_allow=["A" * 17 + "@192.0.2.7"])
    config(scp_bind="0.0.0.0", scp_allow=["UNIT7@192.0.2.7", "UNIT8@[2001:db8::8]:104"])
    config(scp_bind="0.0.0.0", scp_accept_any=True)
    config(scp_bind="127.0.0.1")
    config(scp_bind="::1", scp_allow=["UNIT8"])
    assert EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_bind="0.0.0.0").validate()  # no receiver


def test_modality_entries_parse_and_match_host_and_port() -> None:
    from lungseg.edge_runtime.modalities import Modality, ModalityList

    assert Modality.parse("CR1") == Modality("CR1")
    assert Modality.parse(" CR1 @ 10.0.0.5:104") == Modality("CR1", "10.0.0.5", 104)
    assert Modality.parse("CR1@[fd00::5]:11112") == Modality("CR1", "fd00::5", 11112)
    assert Modality.parse("CR1@fd00::5") == Modality("CR1", "fd00::5", None)
    assert str(Modality.parse("CR1@[fd00::5]:11112")) == "CR1@[fd00::5]:11112"
    modalities = ModalityList([Modality("CR1", "10.0.0.5"), Modality("CR2", "localhost", 4000), Modality("ANY")])
    modalities.resolve()
    assert modalities.allows("CR1", "10.0.0.5", 50000) and modalities.allows("CR1", "::ffff:10.0.0.5", 1)
    assert not modalities.allows("CR1", "10.0.0.6", 50000) and not modalities.allows("CR3", "10.0.0.5", 1)
    assert modalities.allows("CR2", "127.0.0.1", 4000) and not modalities.allows("CR2", "127.0.0.1", 4001)
    assert modalities.allows("ANY", "198.51.100.1", 1)


@pytest.mark.integration
def test_an_allowed_title_from_another_host_or_port_is_rejected(tmp_path: Path) -> None:
    """The modality list on a real association: title and host (and port) must both match."""
    import socket

    from lungseg.edge_runtime.receiver import StorageReceiver

    folder = tmp_path / "watch"
    folder.mkdir()
    with socket.socket() as probe:  # a free local port for the sender's own end
        probe.bind(("127.0.0.1", 0))
        sender_port = probe.getsockname()[1]
    scp = StorageReceiver(folder, 0, "LUNGSEG", "127.0.0.1",
                          ["FARAWAY@192.0.2.9", f"PINNED@127.0.0.1:{sender_port}", "LOCAL@127.0.0.1"])
    _, port = scp.start()
    try:
        def call(title: str, bind_port: int = 0):
            return associate(port, title, classes=["1.2.840.10008.1.1"], bind_port=bind_port)

        assert call("FARAWAY").is_rejected  # an allowed title, from a host its entry does not name
        assert call("PINNED").is_rejected  # right host, another port
        for title, bind_port in (("LOCAL", 0), ("PINNED", sender_port)):
            assoc = call(title, bind_port)
            assert assoc.is_established, title
            try:
                assert int(assoc.send_c_echo().Status) == 0
            finally:
                assoc.release()
        assert call("INTRUDER").is_rejected  # not on the list at all
    finally:
        scp.stop()


def test_connection_limits_are_settings_that_reach_the_receiver(tmp_path: Path) -> None:
    from lungseg.edge_runtime.config import ConfigError, EdgeConfig
    from lungseg.edge_runtime.services import start_receiver

    (tmp_path / "w").mkdir()
    config = EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_port=0, scp_max_associations=3,
                        scp_max_per_host=2, scp_handshake_seconds=4.0, scp_association_seconds=90.0).validate()
    receiver = start_receiver(config)
    try:
        guard = receiver.guard
        assert (guard.max_established, guard.per_host, guard.handshake_seconds, guard.association_seconds) == (
            3, 2, 4.0, 90.0)
        assert guard.max_dataset == config.decode_limits().max_file_bytes  # data sets counted as they arrive
    finally:
        receiver.stop()
    for bad in ({"scp_max_per_host": 9}, {"scp_max_associations": 0}, {"scp_association_seconds": 1.0}):
        with pytest.raises(ConfigError, match="scp_"):
            EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", **bad).validate()
