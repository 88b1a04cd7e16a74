"""Build time of the co-purchase graph on a seeded synthetic log; prints JSON."""

import json
import time

from recsys_hnm.data import copurchase_graph, describe_graph, synthetic


def main(n_events: int = 1_000_000) -> dict:
    data = synthetic(50_000, 200_000, n_events, duplicates="keep", seed=0)
    out = {"interactions": len(data.events)}
    for source in ("basket", "session"):
        start = time.perf_counter()
        graph = copurchase_graph(data.events, data.n_items, source=source, min_count=1)
        out[f"{source}_build_s" if source != "basket" else "build_s"] = round(time.perf_counter() - start, 3)
        if source == "basket":
            out.update(describe_graph(graph))
    start = time.perf_counter()
    copurchase_graph(data.events, data.n_items, source="history", window=5, top_n=50)
    out["history_window5_top50_build_s"] = round(time.perf_counter() - start, 3)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
