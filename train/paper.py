"""The numbers Vidal et al. (2021) report, for side-by-side tables."""

from __future__ import annotations

TABLE1_STAGE1 = {
    "mean": {"ACC": 0.8813, "AUC": 0.9702, "DICE": 0.9554, "JACC": 0.9156, "PREC": 0.9064, "RECA": 0.8267,
             "F1": 0.8366, "SENS": 0.6703, "SPEC": 0.9832},
    "std": {"ACC": 0.0855, "AUC": 0.0244, "DICE": 0.0250, "JACC": 0.0432, "PREC": 0.0573, "RECA": 0.1247,
            "F1": 0.1315, "SENS": 0.2528, "SPEC": 0.0132},
}
TABLE2_STAGE2 = {
    "mean": {"ACC": 0.9773, "AUC": 0.9695, "DICE": 0.9436, "JACC": 0.8936, "PREC": 0.9656, "RECA": 0.9644,
             "F1": 0.9641, "SENS": 0.9423, "SPEC": 0.9864},
    "std": {"ACC": 0.0097, "AUC": 0.0243, "DICE": 0.0243, "JACC": 0.0419, "PREC": 0.0175, "RECA": 0.0228,
            "F1": 0.0152, "SENS": 0.0500, "SPEC": 0.0107},
}
TABLE34_METRICS = ("ACC", "AUC", "DICE", "JACC", "SENS", "SPEC")
TABLE34_BY_CLASS = {
    "covid": {
        "stage1": {"ACC": 0.9570, "AUC": 0.9377, "DICE": 0.8936, "JACC": 0.8142, "SENS": 0.8729, "SPEC": 0.9844},
        "stage2": {"ACC": 0.9761, "AUC": 0.9705, "DICE": 0.9447, "JACC": 0.8961, "SENS": 0.9444, "SPEC": 0.9867},
    },
    "normal": {
        "stage1": {"ACC": 0.9555, "AUC": 0.9326, "DICE": 0.8854, "JACC": 0.8014, "SENS": 0.8576, "SPEC": 0.9864},
        "stage2": {"ACC": 0.9801, "AUC": 0.9752, "DICE": 0.9528, "JACC": 0.9103, "SENS": 0.9470, "SPEC": 0.9906},
    },
    "pathological": {
        "stage1": {"ACC": 0.9476, "AUC": 0.9228, "DICE": 0.8536, "JACC": 0.7551, "SENS": 0.8536, "SPEC": 0.9754},
        "stage2": {"ACC": 0.9769, "AUC": 0.9649, "DICE": 0.9414, "JACC": 0.8910, "SENS": 0.9340, "SPEC": 0.9891},
    },
}
