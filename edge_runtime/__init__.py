"""The DICOM folder-watching segmentation daemon, ``lungseg-edge`` (never imports torch).

Modules, one job each:

``cli``              argument parsing and the ``run``/``render``/``status``/``demo`` commands
``config``           settings: defaults < TOML file < flags
``daemon``           the service loop: start-up, signals, systemd notify, batching, teardown
``services``         the optional network services: metrics endpoint and DICOM receiver
``watcher``          which files are complete (inotify close/rename, or stable size)
``pipeline``         the :class:`~lungseg.edge_runtime.pipeline.Processor`: runs the stages on a batch
``stages``           decode -> gate, segment -> measure / QA -> render -> write -> publish, one unit each
``admission``        the decode stage: reading a ready file safely, hashing, dedupe, fault classification
``isolate``          untrusted decoding in a memory- and time-limited worker process
``decoding``         decoding untrusted bytes, in process or as that worker (its request loop)
``worker_entry``     the worker's import-free entry point (thread limits before any library loads)
``codes``            outcome statuses, reason codes and QA flag codes (enums)
``sidecar``          the JSON sidecar: typed, versioned, with its JSON Schema (``sidecar.schema.json``)
``names``            keyed-hash file references (no file names leave the process)
``overlay``          drawing the mask, legend, areas and caption (cv2)
``ledger``           SQLite ledger (WAL) keyed by SOPInstanceUID and content sha256
``quarantine``       rejected inputs with a reason file
``audit``            the hash-chained audit trail (``<state>/audit``) and ``lungseg-edge audit verify|show``
``retention``        the disk guard (low free space pauses work) and age-based retention
``fsio``             atomic, fsynced writes; reading inputs without following links
``backend_status``   the serving backend's state for operators (``<state>/backend.json``)
``service_metrics``  Prometheus metrics and ``/healthz`` (the ``[metrics]`` extra; Dice is :mod:`lungseg.metrics`)
``forward``          C-STORE forwarding of the outputs to a PACS, from a durable queue
``receiver``         a DICOM Storage SCP writing into the watch folder
``modalities``       the receiver's modality list (AE title + host + port) and the network-bind rule
``scp_guard``        the receiver's connection limits (handshake deadline, per-host caps, evicting idle sockets)
``tls``              DICOM TLS contexts for the receiver and the forwarder
``drift_monitor``    input/output drift against the bundle's reference (rolling windows, gauges)
``drift_report``     ``lungseg-edge drift``: the drift report (text, JSON, histogram PNG)
``sdnotify``         systemd's notify protocol
``logs``             text or JSON-lines logging without patient data
``samples``          sample DICOMs for the demo (pydicom-data)
"""
