"""V^s to disk while G works (01_generate.py, §4): one thread encodes the videos of G's call i (x264 on
one core, byte-stable: video_io.X264_PARAMS) while G renders call i + 1. At most one call's videos
wait, and a failed write stops the run."""
import os
from concurrent.futures import ThreadPoolExecutor

from synvita.render_rows import on_disk
from synvita.video_io import write_video


class Encoder:
    """`with Encoder(out_dir, fps) as encoder: encoder.write(rows, videos)` for each call of G: the rows'
    videos go to <out_dir>/<syn_video> (video_io.write_video, atomically) where not on disk yet."""

    def __init__(self, out_dir, fps):
        self.out_dir, self.fps, self.writing = out_dir, fps, []  # writing: the last call's pending videos

    def __enter__(self):
        # one thread beside G: x264 runs on one core (threads=1, for the same bytes on every machine)
        self.encoder = ThreadPoolExecutor(1)
        return self

    def write(self, batch, videos):
        """Hand a call's videos (uint8 (T, H, W, 3) each, in the order of its rows) to the thread."""
        # waiting here keeps at most one call's frames in memory (a 720x480x49 video: ~50 MB each)
        for done in self.writing:
            done.result()  # the previous videos are on disk (or their error is raised here)
        # a row already on disk (a call that runs again after a kill) keeps its file: same seed, same bytes
        self.writing = [self.encoder.submit(write_video, os.path.join(self.out_dir, row["syn_video"]), frames, fps=self.fps)
                        for row, frames in zip(batch, videos) if not on_disk(row, self.out_dir)]

    def __exit__(self, *exc):
        """The last call's videos on disk (a run stopped by an error only waits for the writes under way)."""
        with self.encoder:  # shuts the thread down, after its writes, whatever happens below
            if exc[0] is None:  # G rendered every call: the last one's videos must be on disk too
                for done in self.writing:
                    done.result()  # a failed write is raised here, before generated.csv lists it
