"""The DICOM folder-watching segmentation daemon, ``lungseg-edge`` (never imports torch).

Modules, one job each:

``cli``         argument parsing and the ``run``/``render``/``status``/``demo`` commands
``config``      settings: defaults < TOML file < flags
``daemon``      the service loop: start-up, signals, systemd notify, batching
``watcher``     which files are complete (inotify close/rename, or stable size)
``pipeline``    admit -> decode -> dedupe -> segment -> write -> record
``admission``   reading a ready file safely, hashing, dedupe, fault classification
``isolate``     untrusted decoding in a memory- and time-limited worker process
``names``       keyed-hash file references (no file names leave the process)
``dicom_out``   overlay Secondary Capture and binary Segmentation (highdicom)
``overlay``     drawing the mask, legend, areas and caption (cv2)
``ledger``      SQLite ledger (WAL) keyed by SOPInstanceUID and content sha256
``quarantine``  rejected inputs with a reason file
``fsio``        atomic, fsynced writes; reading inputs without following links
``sdnotify``    systemd's notify protocol
``logs``        text or JSON-lines logging without patient data
``samples``     sample DICOMs for the demo (pydicom-data)
``harness``     mutation fuzzer and kill -9 soak (``make fuzz``, ``make soak``)
"""
