"""Wan trains on clips in the data folder (a GIF, an animated WebP, a video file with PyAV): the first 4k + 1 frames,
at most 17, each preprocessed as a photo, encoded as one video; image families skip clips with a note."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tlora.common.errors import UsageError
from tlora.common.images import frames_used, load_clip, load_pixels
from tlora.common.messages import Note
from tlora.families.wan import Wan
from tlora.train.conditioning import Conditioning, encode_image
from tlora.train.objective import diffusion_loss

from conftest import assert_helpful
from helpers import train_args, with_flags

CPU = torch.device("cpu")


def write_clip(path: Path, frames: int, seed: int = 0) -> Path:
    """An animated GIF or WebP (by suffix) of `frames` random frames."""
    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(80, 96, 3) * 255).astype("uint8")) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=60, loop=0, lossless=True)
    return path


@pytest.fixture
def clip_dir(image_dir, tmp_path) -> Path:
    """The two test photos and a 9-frame GIF."""
    data = Path(shutil.copytree(image_dir, tmp_path / "data"))
    write_clip(data / "walk.gif", 9)
    return data


def wan_args(model: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return with_flags(train_args(model, data, tmp_path / "out", "--trainer_class", "wan_tlora"), extra)


def test_frames_used_are_the_first_4k_plus_1_up_to_the_cap():
    assert [frames_used(n, 4, 17) for n in (1, 4, 5, 8, 9, 10, 17, 21, 40)] == [1, 1, 5, 5, 9, 9, 17, 17, 17]
    assert Wan.clip_frames == 17 and Wan.frames_multiple == 4


def test_a_clip_is_its_frames_preprocessed_as_photos_and_encoded_as_one_video(wan_pipe, tmp_path):
    """A 9-frame GIF: (3, 9, H, W), each frame as load_pixels makes that frame saved as a photo; the VAE gives
    (9 - 1) / 4 + 1 = 3 latent frames, the shape conditioning_shapes says, the first one the first frame's alone
    (the VAE is causal); a 7-frame WebP trains on its first 5 (2 latent frames)."""
    gif = write_clip(tmp_path / "walk.gif", 9)
    pixels, crop = load_clip(gif, 32, Wan.resize_first, 4, 17)
    assert pixels.shape == (3, 9, 32, 32) and crop == 80
    with Image.open(gif) as raw:
        for i in range(9):
            raw.seek(i)
            raw.convert("RGB").save(tmp_path / f"{i}.png")
            assert torch.equal(pixels[:, i], load_pixels(tmp_path / f"{i}.png", 32, Wan.resize_first)[0])
    encoded = encode_image(Wan, wan_pipe, gif, 32, CPU, clip=True)
    assert encoded["mean"].shape == Wan.conditioning_shapes(wan_pipe.transformer, 32, 16, frames=9)["mean"] == (
        1, 16, 3, 4, 4)
    photo = encode_image(Wan, wan_pipe, tmp_path / "0.png", 32, CPU, clip=True)["mean"]
    assert photo.shape == (1, 16, 1, 4, 4) and torch.allclose(encoded["mean"][:, :, :1], photo, atol=1e-5)
    assert encode_image(Wan, wan_pipe, gif, 32, CPU)["mean"].shape == (1, 16, 1, 4, 4)  # a class image: a photo
    webp = write_clip(tmp_path / "turn.webp", 7)
    assert encode_image(Wan, wan_pipe, webp, 32, CPU, clip=True)["mean"].shape == (1, 16, 2, 4, 4)


def test_the_loss_on_a_clip_and_class_photos_predicts_each_apart(wan_pipe, clip_dir, tmp_path):
    """Instance clips and class photos cannot share a tensor: the batch gives the class rows apart and the loss is
    instance + weight * class, each predicted (flow matching on all 3 latent frames) in its own call; a (b, 1, h, w)
    loss mask broadcasts over the (b, 16 x 3, h, w) prediction."""
    conditioning = Conditioning(Wan, wan_pipe, [clip_dir / "walk.gif"], "a sks dog", 32, CPU, [clip_dir / "00.png"],
                                "a dog", max_sequence_length=16)
    batch = conditioning.batch({"instance": torch.tensor([0]), "class": torch.tensor([0])})
    assert batch["mean"].shape == (1, 16, 3, 4, 4) and batch["class"]["mean"].shape == (1, 16, 1, 4, 4)
    scheduler, model = Wan.noise_scheduler(wan_pipe), wan_pipe.transformer
    torch.manual_seed(0)
    with torch.no_grad():
        loss = diffusion_loss(Wan, model, wan_pipe, scheduler, batch, torch.float32, 0.5)
    torch.manual_seed(0)
    instance = {k: v for k, v in batch.items() if k != "class"}
    with torch.no_grad():
        pred, target = Wan.predict(model, wan_pipe, scheduler, instance, torch.float32, 1.0)
        prior = F.mse_loss(*Wan.predict(model, wan_pipe, scheduler, batch["class"], torch.float32, 1.0))
    assert pred.shape == target.shape == (1, 48, 4, 4)
    assert torch.allclose(loss, F.mse_loss(pred, target) + 0.5 * prior)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    with torch.no_grad():
        masked = diffusion_loss(Wan, model, wan_pipe, scheduler, instance | {"mask": mask}, torch.float32, None)
    assert masked.shape == () and torch.isfinite(masked)


def test_clips_are_checked_before_the_model_loads(tiny_wan, clip_dir, tmp_path):
    """A clip counts in the data digest (resume refuses other data); a batch holds one frame count, and loss masks
    are for photos: both refused in one line; frames a clip has beyond what trains are said in a note."""
    from tlora.train.options import parse_args

    digest = parse_args(wan_args(tiny_wan, clip_dir, tmp_path)).data_sha256
    write_clip(clip_dir / "walk.gif", 9, seed=1)
    assert parse_args(wan_args(tiny_wan, clip_dir, tmp_path)).data_sha256 != digest
    for extra, message in ((("--train_batch_size", "2"), "--train_batch_size 2: the training items train on different "
                            "numbers of frames (00.png 1 frame, walk.gif 9 frames) and a batch holds one; pass "
                            "--train_batch_size 1"),
                           (("--alpha_mask",), "--alpha_mask: walk.gif is a clip (9 frames train) and loss masks are "
                            "for photos; drop --alpha_mask")):
        with pytest.raises(UsageError, match=message.replace("(", "[(]").replace(")", "[)]")) as err:
            parse_args(wan_args(tiny_wan, clip_dir, tmp_path, *extra))
        assert_helpful(str(err.value))
    write_clip(clip_dir / "walk.gif", 10)
    with pytest.warns(Note) as said:
        parse_args(wan_args(tiny_wan, clip_dir, tmp_path))
    assert [str(w.message) for w in said if "clip" in str(w.message)] == [
        "--train_data_dir: clips train on their first 4k + 1 frames, at most 17 (what wan's VAE encodes): walk.gif 9 "
        "of 10 frames; trim a clip to make it so"]


def test_a_video_file_without_pyav_is_refused_in_one_line(tiny_wan, clip_dir, tmp_path, monkeypatch):
    from tlora.train.options import parse_args

    (clip_dir / "run.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails, installed or not
    with pytest.raises(UsageError, match="--train_data_dir: run.mp4 is a video; reading its frames needs PyAV: pip "
                                         "install av") as err:
        parse_args(wan_args(tiny_wan, clip_dir, tmp_path))
    assert_helpful(str(err.value))


def test_an_image_family_skips_clips_with_a_note(tiny_sdxl, clip_dir, tmp_path):
    """SDXL trains on photos: video files and GIFs are named as skipped; an animated WebP is a photo, its first
    frame used (as before clips trained)."""
    from tlora.train.options import parse_args

    for name in ("run.mp4", "walk.WEBM"):
        (clip_dir / name).write_bytes(b"\0" * 64)
    write_clip(clip_dir / "turn.webp", 3)
    with pytest.warns(Note) as said:
        opts = parse_args(train_args(tiny_sdxl, clip_dir, tmp_path / "out"))
    notes = [str(w.message) for w in said]
    assert (f"--train_data_dir: run.mp4, walk.WEBM, walk.gif in {clip_dir} are clips, skipped: only photos (.jpg, "
            ".jpeg, .png, .webp, .bmp) are read (sdxl trains on photos); save frames as images to train on "
            "them") in notes
    assert any("turn.webp is animated (3 frames); its first frame is used" in n for n in notes)
    for name in ("run.mp4", "walk.WEBM", "walk.gif"):
        (clip_dir / name).unlink()
    with pytest.warns(Note, match="turn.webp is animated"):
        assert parse_args(train_args(tiny_sdxl, clip_dir, tmp_path / "out")).data_sha256 == opts.data_sha256

def test_a_video_file_trains_on_its_first_frames_with_pyav(wan_pipe, tmp_path):
    """With PyAV installed (skipped without): an mp4 of 12 frames is its first 9, each as a photo would be."""
    av = pytest.importorskip("av")
    rng = np.random.RandomState(0)
    frames = [Image.fromarray((rng.rand(80, 96, 3) * 255).astype("uint8")) for _ in range(12)]
    with av.open(str(tmp_path / "run.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 96, 80, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    pixels, _ = load_clip(tmp_path / "run.mp4", 32, Wan.resize_first, 4, 17)
    with av.open(str(tmp_path / "run.mp4")) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    decoded[3].save(tmp_path / "3.png")
    assert len(decoded) == 12 and pixels.shape == (3, 9, 32, 32)
    assert torch.equal(pixels[:, 3], load_pixels(tmp_path / "3.png", 32, Wan.resize_first)[0])
    assert encode_image(Wan, wan_pipe, tmp_path / "run.mp4", 32, CPU, clip=True)["mean"].shape == (1, 16, 3, 4, 4)


@pytest.mark.slow
def test_train_py_trains_wan_on_a_clip_and_class_photos(tiny_wan, clip_dir, class_dir, tmp_path, monkeypatch):
    """Two steps on the tiny Wan with a 9-frame GIF beside the photos, with prior preservation: the clip encodes to
    3 latent frames, the photos (the class images too) to one."""
    import train

    shapes = []
    encode = Wan.encode_pixels.__func__
    monkeypatch.setattr(Wan, "encode_pixels", classmethod(
        lambda cls, *args: shapes.append(tuple((out := encode(cls, *args))["mean"].shape)) or out))
    out = tmp_path / "out"
    assert train.main(wan_args(tiny_wan, clip_dir, tmp_path, "--trainer_type", "lora", "--num_train_epochs", "2",
                               "--max_sequence_length", "16", "--mixed_precision", "no",
                               "--with_prior_preservation", "--class_data_dir", str(class_dir))) == 0
    assert sorted(shapes) == [(1, 16, 1, 8, 8)] * 5 + [(1, 16, 3, 8, 8)]  # 00.png, 01.jpg, 3 class photos; walk.gif
    (folder,) = out.iterdir()
    assert (folder / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
