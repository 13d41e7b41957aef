"""Loitering alerts from per-class IoU tracking over consecutive frames.

The simplest tracker that answers "has this animal stayed in view?": within one source (a
video or a folder of frames), each detection of a watched class is matched to the
same-class track from the previous frame with the highest box IoU (at least
``min_iou``); greedy, highest IoU first. A matched track's run length grows by one, an
unmatched detection starts a new track, and a track with no match in a frame ends (the
animal left, or the detector missed it once). When a run exceeds ``loiter_frames``
consecutive frames the track raises one "loitering" alert, and no more while it lasts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from inat.detect.boxes import iou
from inat.detect.detector import Detection


@dataclass
class Track:
    """One object followed across frames: its class, last box and consecutive-frame run."""

    track_id: int
    name: str
    box: Tuple[float, float, float, float]
    frames: int = 1
    alerted: bool = False


@dataclass
class LoiterTracker:
    """Follows watched detections frame by frame and reports tracks that stay too long."""

    loiter_frames: int
    min_iou: float = 0.3
    tracks: List[Track] = field(default_factory=list)
    _next_id: int = 0

    def update(self, detections: Sequence[Detection]) -> Tuple[Dict[int, Track], List[Track]]:
        """Advance one frame; return (detection index -> its track, tracks alerting now).

        ``detections`` should hold only watched classes. Tracks not matched this frame are
        dropped, so the run counts strictly consecutive frames.
        """
        pairs = []
        for d_index, det in enumerate(detections):
            for t_index, track in enumerate(self.tracks):
                if track.name == det.name:
                    overlap = iou(list(track.box), list(det.box))
                    if overlap >= self.min_iou:
                        pairs.append((overlap, d_index, t_index))
        pairs.sort(reverse=True)
        matched: Dict[int, Track] = {}
        used_tracks = set()
        for _, d_index, t_index in pairs:
            if d_index in matched or t_index in used_tracks:
                continue
            track = self.tracks[t_index]
            track.box, track.frames = detections[d_index].box, track.frames + 1
            matched[d_index] = track
            used_tracks.add(t_index)
        for d_index, det in enumerate(detections):
            if d_index not in matched:
                matched[d_index] = Track(self._next_id, det.name, det.box)
                self._next_id += 1
        self.tracks = list(matched.values())
        alerts = []
        for track in self.tracks:
            if track.frames > self.loiter_frames and not track.alerted:
                track.alerted = True
                alerts.append(track)
        return matched, alerts
