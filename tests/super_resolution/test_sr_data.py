"""SR conditions from folders of your own images, and the comparison panels."""

import numpy as np
import pytest
import torch
from PIL import Image

from domains.super_resolution.data import ImageFolderSRDataModule, SRCondition
from domains.super_resolution.glyphs import downsample


def image_folder(path, n=3, size=(40, 48), seed=0):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(path / f"{k}.png")
    return path


def test_image_folders_give_paired_conditions_with_short_names(tmp_path):
    dm = ImageFolderSRDataModule(str(image_folder(tmp_path / "train")), str(image_folder(tmp_path / "val", seed=1)),
                                 hr_size=32, batch_size=2, epoch_size=6, prompt="a photo")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and all(isinstance(c, SRCondition) for c in batch)
    c = batch[0]
    assert c["hr"].shape == (3, 32, 32) and c["image"].shape == (3, 8, 8) and c["prompt"] == "a photo"
    torch.testing.assert_close(c["image"], downsample(c["hr"][None])[0])
    assert str(c).endswith(".png") and "tensor" not in repr(batch)  # logs and CSV rows show the file name
    val = [c for b in dm.val_dataloader() for c in b]
    assert [str(c) for c in val] == ["0.png", "1.png", "2.png"]
    src = np.asarray(Image.open(tmp_path / "val" / "0.png"), dtype=np.float32) / 255  # the centre crop, exactly
    torch.testing.assert_close(val[0]["hr"], torch.from_numpy(src[4:36, 8:40]).permute(2, 0, 1))


def test_training_crops_are_seeded_and_differ_across_images(tmp_path):
    train, val = image_folder(tmp_path / "train"), image_folder(tmp_path / "val")
    a = ImageFolderSRDataModule(str(train), str(val), hr_size=16, batch_size=3, epoch_size=3, seed=5)
    b = ImageFolderSRDataModule(str(train), str(val), hr_size=16, batch_size=3, epoch_size=3, seed=5)
    ba, bb = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert [str(c) for c in ba] == [str(c) for c in bb]
    assert all(torch.equal(x["hr"], y["hr"]) for x, y in zip(ba, bb))


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        ImageFolderSRDataModule(str(tmp_path / "nope"), str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no images"):
        ImageFolderSRDataModule(str(tmp_path / "empty"), str(tmp_path / "empty"))
    small = image_folder(tmp_path / "small", size=(20, 20))
    dm = ImageFolderSRDataModule(str(small), str(small), hr_size=32)
    with pytest.raises(ValueError, match="smaller than hr_size"):
        next(iter(dm.val_dataloader()))
    with pytest.raises(ValueError, match="not divisible"):
        ImageFolderSRDataModule(str(small), str(small), hr_size=30)


def test_comparison_panel_layout(tmp_path):
    from domains.super_resolution.panels import CAPTION, SCALE, column_x, comparison_rows, save_panel

    conds = [SRCondition(image=torch.rand(3, 8, 8), hr=torch.rand(3, 32, 32), prompt="x") for _ in range(3)]
    sr = torch.stack([c["hr"] for c in conds])
    panel = comparison_rows(conds, [("perfect", sr, ["HS 0"] * 3), ("grey", torch.full_like(sr, 0.5), ["?"] * 3)])
    side = 32 * SCALE
    assert panel.width >= 6 * side and panel.height >= 3 * side
    arr = np.asarray(panel, dtype=np.float32)
    y0 = CAPTION  # below the header; the perfect model's |SR - GT| tile is black, the grey one's is not
    x_diff_perfect = column_x(3, side)
    assert arr[y0 + 5:y0 + side - 5, x_diff_perfect + 5:x_diff_perfect + side - 5].max() == 0
    x_diff_grey = column_x(5, side)
    assert arr[y0 + 5:y0 + side - 5, x_diff_grey + 5:x_diff_grey + side - 5].max() > 0
    assert save_panel(panel, tmp_path / "p.png").is_file()
    with pytest.raises(ValueError, match="captions"):
        comparison_rows(conds, [("bad", sr, ["one"])])


def test_conditions_carry_seeded_lr_noise_and_repeats_get_their_own_crop(tmp_path):
    train = image_folder(tmp_path / "train", n=2)
    dm = ImageFolderSRDataModule(str(train), str(train), hr_size=16, batch_size=4, epoch_size=4, seed=3)
    items = {str(i): dm.train[i] for i in range(4)}  # positions 0..3 of the epoch: images 0, 1, 0, 1
    assert str(items["0"]) == str(items["2"]) == "0.png"
    assert not torch.equal(items["0"]["hr"], items["2"]["hr"])  # the same image, another crop
    again = dm.train[0]
    assert torch.equal(again["lr_noise"], items["0"]["lr_noise"]) and again["lr_noise"].shape == (3, 4, 4)
    assert not torch.equal(items["0"]["lr_noise"], items["1"]["lr_noise"])
