"""Video files: decord reads the frames a stage samples; x264 writes mp4s whose bytes depend on the
frames alone (the same frames, the same file, on any x86_64 machine and in any process)."""
import os

import numpy as np

from synvita.disk import atomic_path
from synvita.runs import UserError


def frame_indices(num_total, num_frames, sampling="uniform"):
    """Which frames to keep. "uniform": np.linspace over the clip, truncated to integers, as the
    released Video-LLaVA code and the transformers model card do; "middle": the middle frame of each
    of num_frames equal segments; "videocon": VideoCon's rule for mPLUG-Owl (its processing_mplug_owl.py
    get_index): seg = (N - 1) / num_frames, frame int(seg / 2) + round(seg * i)."""
    if sampling == "uniform":
        return np.linspace(0, num_total - 1, num_frames, dtype=int)
    if sampling == "middle":
        edges = np.linspace(0, num_total, num_frames + 1)
        return np.minimum(((edges[:-1] + edges[1:]) / 2).astype(int), num_total - 1)
    if sampling == "videocon":
        seg = (num_total - 1) / num_frames
        return np.array([int(seg / 2) + int(np.round(seg * i)) for i in range(num_frames)])
    raise UserError(f"unknown frame sampling {sampling!r}: use 'uniform', 'middle' or 'videocon'")

def read_video(path, num_frames=8, sampling="uniform"):
    """Decode `num_frames` frames with decord -> uint8 array (num_frames, H, W, 3).

    Raises FileNotFoundError / ValueError naming the file if it is missing, unreadable or empty.
    (decord 0.6 cannot read back some tiny widths, e.g. 16/24/48/72 px; real video sizes are fine.)"""
    import decord
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        vr = decord.VideoReader(path, num_threads=1)  # one thread: the stages parallelise over videos
        n = len(vr)  # frames in the file
        if n == 0:
            raise ValueError("no frames")
        return vr.get_batch(list(frame_indices(n, num_frames, sampling))).asnumpy()
    except Exception as e:  # decord raises its own DECORDError; name the file in every case
        raise ValueError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e

def rgb_to_yuv420(frames):
    """uint8 RGB frames (T, H, W, 3), H and W even -> the yuv420p planes as PyAV takes them, one
    (H * 3 / 2, W) array a frame: Y, then U, then V (BT.601, limited range, the colours that
    decoders assume for an untagged SD video). Integer arithmetic only, so the same frames give
    the same planes on every machine (libswscale picks a SIMD path by CPU; its paths need not agree)."""
    r, g, b = (frames[..., c].astype(np.int32) for c in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16  # the classic 8-bit BT.601 coefficients
    t, h, w = y.shape

    def chroma(k_r, k_g, k_b):  # one chroma sample per 2x2 block: the sum of 4 pixels, rounded once
        c = (k_r * r + k_g * g + k_b * b).reshape(t, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
        return ((c + 512) >> 10) + 128
    u, v = chroma(-38, -74, 112), chroma(112, -94, -18)
    planes = [y.reshape(t, -1), u.reshape(t, -1), v.reshape(t, -1)]
    return np.concatenate(planes, axis=1).reshape(t, h * 3 // 2, w).clip(0, 255).astype(np.uint8)

# x264's settings for every video we write. NOTE (deviation from x264's defaults): the same frames
# must give the same bytes, whatever the machine, the process, or what ran in it before. With
# x264's defaults they did not: the thread count follows the CPU count and changes the bitstream,
# and at the toy world's 32x32 and 64x32 an AVX-512 machine wrote other bytes once torch had run in
# the process. So: one thread; x264's plain C code (asm=0), the same instructions on every x86_64
# CPU; and no weighted prediction (weightp=0, and psy=0, without which x264 still runs a "fake" one):
# its C code reads uninitialised padding of x264's frames, as valgrind shows (psy's tuning is for
# human eyes anyway). Cost: ~5 s per 720x480x49 video on one core (0.7 s with the defaults), which
# 01_generate.py hides behind the next video's generation.
X264_PARAMS = "threads=1:asm=0:weightp=0:psy=0"

def tag_bt601(codec):
    """Tag a video as BT.601 (SMPTE 170M), limited range: what rgb_to_yuv420 writes, and what a
    player would otherwise guess for SD sizes only (browsers take untagged HD video as BT.709)."""
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
    codec.colorspace = Colorspace.ITU601  # the BT.601 matrix (FFmpeg's BT470BG = SMPTE170M's)
    codec.color_primaries, codec.color_trc = ColorPrimaries.SMPTE170M, ColorTrc.SMPTE170M
    codec.color_range = ColorRange.MPEG  # limited range: Y in 16..235

def write_video(path, frames, fps=8):
    """Write uint8 frames (T, H, W, 3) as H.264 mp4 (x264 at its default CRF 23), atomically; the
    same frames give the same file, byte for byte. Odd sizes are cropped to even."""
    import av
    # yuv420p halves the chroma in both directions: H.264 in this format needs even sizes
    frames = np.asarray(frames)[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with atomic_path(path) as tmp:  # a killed run leaves a *.tmp<pid>.mp4, never a truncated final file
        with av.open(tmp, "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"x264-params": X264_PARAMS})
            stream.thread_count, stream.thread_type = 1, "NONE"  # no FFmpeg-side threads either
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            tag_bt601(stream.codec_context)  # say which colours rgb_to_yuv420 wrote
            for planes in rgb_to_yuv420(frames):  # already yuv420p: PyAV hands them to x264 as they are
                container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
            container.mux(stream.encode())  # flush
