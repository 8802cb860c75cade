"""Real dense-prediction datasets (kdzoo.data.dense_folders) on tiny folders written here: a VOC 2012 tree, a
Cityscapes tree, a COCO tree, a COCO-style JSON folder and a folder of images + masks.  Nothing is downloaded: a
fixture refuses every socket connection."""
import json
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import kdzoo.data.dense_folders as dense_folders
from kdzoo.config import TrainConfig
from kdzoo.data import DataSplits, Placement, build_dataset, input_example, make_loader
from kdzoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from kdzoo.data.scenes import DetectionData
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    connect = socket.socket.connect

    def local_only(sock, address):  # DataLoader workers talk over Unix sockets: those stay allowed
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a dense dataset test tried to reach the network ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def _rgb(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _normalised(image, size):
    """The expected float image: PIL bilinear resize, /255, ImageNet mean/std."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    return (tensor - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _nearest(mask_values, size):
    return np.asarray(Image.fromarray(mask_values).resize((size, size), Image.NEAREST))


def _one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------- PASCAL VOC


VOC_SPLITS = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}
VOC_SIZE = (24, 20)  # width, height: not square, so the resize scales x and y differently


def _voc_xml(path, objects, size=VOC_SIZE):
    parts = [f"<annotation><filename>{path.stem}.jpg</filename><size><width>{size[0]}</width>"
             f"<height>{size[1]}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    path.write_text("".join(parts) + "</annotation>")


def _write_voc(root):
    """A VOC 2012 tree: JPEG images, palette PNG masks (with a 255 border) and XML annotations."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    masks, objects = {}, {
        "2008_000001": [("dog", (3, 2, 12, 10), 0), ("person", (10, 5, 24, 20), 0), ("cat", (1, 1, 5, 5), 1)],
        "2008_000002": [("bottle", (2, 2, 4, 4), 1)],  # only a difficult object: no box left when skipped
        "2008_000003": [("tvmonitor", (5, 5, 20, 15), 0), ("sheep", (1, 1, 4, 4), 1)]}
    for k, (split, names) in enumerate(VOC_SPLITS.items()):
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        (voc / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for k, name in enumerate(objects):
        _rgb(*VOC_SIZE, k).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        values = np.zeros(VOC_SIZE[::-1], dtype=np.uint8)
        values[2:10, 3:12] = 12  # dog
        values[1:11, 2:13][[0, -1]] = 255  # VOC's object border
        values[5:, 10:] = 15 + k  # person, ...
        mask = Image.fromarray(values, mode="P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        mask.save(voc / "SegmentationClass" / f"{name}.png")
        masks[name] = values
        _voc_xml(voc / "Annotations" / f"{name}.xml", objects[name])
    return masks


def test_voc_segmentation_items_and_border(tmp_path):
    masks = _write_voc(tmp_path / "data")
    data = build_dataset("voc", root=str(tmp_path / "data"), image_size=16, cache_dir=str(tmp_path / "cache"))
    assert isinstance(data, DataSplits) and data.task == "segmentation" and data.num_classes == 21
    assert data.class_names[0] == "background" and data.class_names[12] == "dog" and len(data.class_names) == 21
    assert data.image_size == (16, 16) and len(data.train) == 2 and len(data.test) == 1
    image, mask, index = data.train[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and index == 1
    assert mask.shape == (16, 16) and mask.dtype == torch.long
    expected = torch.from_numpy(_nearest(masks["2008_000002"], 16).astype(np.int64))
    expected[expected == 255] = -1
    assert torch.equal(mask, expected) and (mask == -1).any() and not (mask == 255).any()
    source = Image.open(tmp_path / "data/VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg")
    torch.testing.assert_close(image, _normalised(source, 16), rtol=1e-5, atol=1e-5)
    assert int(data.test[0][1].max()) == 17  # the val image's "person" value 15 + 2
    images, batch_masks, indices = next(iter(make_loader(data.train, 2, shuffle=False)))
    assert images.shape == (2, 3, 16, 16) and batch_masks.shape == (2, 16, 16) and indices.tolist() == [0, 1]


def test_voc_segmentation_default_size_and_cache(tmp_path, monkeypatch):
    _write_voc(tmp_path / "data")
    options = dict(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    first = build_dataset("voc", **options)
    assert first.image_size == (256, 256)
    monkeypatch.setattr(dense_folders, "decode_pairs", lambda *a, **k: pytest.fail("decoded again, not cached"))
    second = build_dataset("voc", **options)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)


def test_voc_detection_boxes_scaled_and_difficult(tmp_path):
    _write_voc(tmp_path / "data")
    data = build_dataset("voc", task="detection", root=str(tmp_path / "data"), image_size=48)
    assert data.task == "detection" and data.num_classes == 21 and data.class_names[1] == "aeroplane"
    assert isinstance(data.train, DetectionData) and data.image_size == (48, 48)
    # 2008_000002's only object is difficult: skipped, so the training split drops the image
    assert len(data.train) == 1 and len(data.test) == 1
    image, target, index = data.train[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and index == 0
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    sx, sy = 48 / 24, 48 / 20
    expected = torch.tensor([[2 * sx, 1 * sy, 12 * sx, 10 * sy], [9 * sx, 4 * sy, 24 * sx, 20 * sy]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [12, 15] and target["labels"].dtype == torch.long
    assert data.class_names[12] == "dog" and data.class_names[15] == "person"
    source = Image.open(tmp_path / "data/VOCdevkit/VOC2012/JPEGImages/2008_000001.jpg").convert("RGB")
    pixels = np.asarray(source.resize((48, 48), Image.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert input_example(data).shape == (1, 3, 48, 48)
    kept = build_dataset("voc", task="detection", root=str(tmp_path / "data"), image_size=48, keep_difficult=True)
    assert len(kept.train) == 2 and kept.train[0][1]["labels"].tolist() == [12, 15, 8]
    assert kept.test[0][1]["labels"].tolist() == [20, 17]
    default = build_dataset("voc", task="detection", root=str(tmp_path / "data"))
    assert default.image_size == (320, 320) and default.train[0][0].shape == (3, 320, 320)


def test_voc_missing_folder_is_one_line(tmp_path):
    for task in ("segmentation", "detection"):
        with pytest.raises(ConfigError) as excinfo:
            build_dataset("voc", task=task, root=str(tmp_path / "nowhere"))
        _one_line_error(excinfo, "data.options.root", "download: true")


def test_voc_bad_annotation(tmp_path):
    _write_voc(tmp_path / "data")
    _voc_xml(tmp_path / "data/VOCdevkit/VOC2012/Annotations/2008_000001.xml", [("unicorn", (1, 1, 3, 3), 0)])
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("voc", task="detection", root=str(tmp_path / "data"))
    _one_line_error(excinfo, "unicorn", "2008_000001.xml")


# ---------------------------------------------------------------- Cityscapes


def _write_cityscapes(root):
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png."""
    label_ids = {}
    for split, names in (("train", ["aachen_000000_000019", "aachen_000001_000019"]), ("val", ["bonn_000000_000019"])):
        city = names[0].split("_")[0]
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for k, name in enumerate(names):
            _rgb(32, 16, k).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            ids = np.zeros((16, 32), dtype=np.uint8)  # 0: unlabeled
            ids[:, 8:16] = 7  # road -> 0
            ids[:, 16:20] = 26  # car -> 13
            ids[:, 20:24] = 33  # bicycle -> 18
            ids[:, 24:28] = 9  # parking: ignored in evaluation -> -1
            ids[:, 28:] = 23 + k  # sky -> 10, person -> 11
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
            label_ids[name] = ids
    return label_ids


def test_cityscapes_train_ids(tmp_path):
    _write_cityscapes(tmp_path / "cityscapes")
    data = build_dataset("cityscapes", root=str(tmp_path / "cityscapes"), image_size=32,
                         cache_dir=str(tmp_path / "cache"))
    assert data.num_classes == 19 and len(data.class_names) == 19 and data.task == "segmentation"
    assert data.class_names[0] == "road" and data.class_names[13] == "car" and data.class_names[18] == "bicycle"
    assert len(data.train) == 2 and len(data.test) == 1
    image, mask, _ = data.train[1]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    # a 32x16 frame resized to 32x32: columns stay put, so each column band keeps its class
    assert mask[:, :8].eq(-1).all() and mask[:, 8:16].eq(0).all() and mask[:, 16:20].eq(13).all()
    assert mask[:, 20:24].eq(18).all() and mask[:, 24:28].eq(-1).all() and mask[:, 28:].eq(11).all()
    assert data.train[0][1][:, 28:].eq(10).all()
    table, names = dense_folders.cityscapes_lookup()
    assert table[7] == 0 and table[33] == 18 and table[0] == -1 and table[34] == -1 and table[255] == -1
    assert names == data.class_names


def test_cityscapes_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("cityscapes", root=str(tmp_path / "none"))
    _one_line_error(excinfo, "data.options.root", "login")


# ---------------------------------------------------------------- COCO and COCO-style JSON


COCO_CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _coco_file(path, images, annotations, categories=COCO_CATEGORIES):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def _write_coco_split(json_path, image_dir, split):
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for k, image_id in enumerate((7, 3, 11)):
        width, height = (40, 20) if k == 0 else (20, 40)
        _rgb(width, height, k).save(image_dir / f"{split}_{image_id:012d}.jpg")
        images.append({"id": image_id, "file_name": f"{split}_{image_id:012d}.jpg", "width": width, "height": height})
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 90, "bbox": [4, 2, 10, 6], "iscrowd": 0, "area": 60},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 10, 20, 20], "iscrowd": 0, "area": 400},  # clipped
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 0, 40, 20], "iscrowd": 1, "area": 800},  # crowd
        {"id": 4, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25},
        {"id": 5, "image_id": 11, "category_id": 1, "bbox": [2, 2, 0, 5], "iscrowd": 0, "area": 0},  # no width
    ]
    _coco_file(json_path, images, annotations)


def _write_coco(root):
    for split in ("train", "val"):
        _write_coco_split(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017", split)


def test_coco_categories_boxes_and_crowd(tmp_path):
    _write_coco(tmp_path / "coco")
    data = build_dataset("coco", root=str(tmp_path / "coco"), image_size=32)
    assert data.task == "detection" and data.num_classes == 4
    assert data.class_names == ("background", "person", "car", "toothbrush")  # increasing category id
    # training drops image 11 (its only box has no width); the val split keeps it, empty
    assert len(data.train) == 2 and len(data.test) == 3
    first, second = data.train[0], data.train[1]  # by image id: 3, then 7
    assert first[1]["labels"].tolist() == [2]
    torch.testing.assert_close(first[1]["boxes"], torch.tensor([[1 * 32 / 20, 1 * 32 / 40, 6 * 32 / 20, 6 * 32 / 40]]))
    assert second[1]["labels"].tolist() == [3, 1]  # the crowd box is skipped
    sx, sy = 32 / 40, 32 / 20
    torch.testing.assert_close(second[1]["boxes"], torch.tensor([[4 * sx, 2 * sy, 14 * sx, 8 * sy],
                                                                  [30 * sx, 10 * sy, 40 * sx, 20 * sy]]))
    assert second[0].shape == (3, 32, 32) and 0 <= float(second[0].min()) and float(second[0].max()) <= 1
    empty = data.test[2][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == torch.long
    subset = build_dataset("coco", root=str(tmp_path / "coco"), image_size=32, max_images=1)
    assert len(subset.train) == 1 and len(subset.test) == 1


def test_coco_missing_folder_and_extra(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco", root=str(tmp_path / "none"))
    _one_line_error(excinfo, "data.options.root", "annotations")
    _write_coco(tmp_path / "coco")
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco", root=str(tmp_path / "coco"))
    _one_line_error(excinfo, "pip install 'kdzoo[dense]'")


def test_coco_json_folder(tmp_path):
    _write_coco_split(tmp_path / "set" / "train.json", tmp_path / "set", "train")
    _write_coco_split(tmp_path / "set" / "val.json", tmp_path / "set", "val")
    data = build_dataset("coco_json", train_json=str(tmp_path / "set/train.json"),
                         val_json=str(tmp_path / "set/val.json"), image_size=16)
    assert data.num_classes == 4 and len(data.train) == 2 and data.train[1][1]["labels"].tolist() == [3, 1]
    assert data.train[0][0].shape == (3, 16, 16)
    elsewhere = build_dataset("coco_json", train_json=str(tmp_path / "set/train.json"),
                              val_json=str(tmp_path / "set/val.json"), images_dir=str(tmp_path / "set"))
    assert elsewhere.image_size == (320, 320) and len(elsewhere.test) == 3


def test_coco_json_errors(tmp_path):
    _write_coco_split(tmp_path / "set" / "train.json", tmp_path / "set", "train")
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco_json", train_json=str(tmp_path / "set/train.json"), val_json=str(tmp_path / "no.json"))
    _one_line_error(excinfo, "data.options.val_json", "no.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco_json", train_json=str(tmp_path / "bad.json"), val_json=str(tmp_path / "set/train.json"))
    _one_line_error(excinfo, "data.options.train_json")
    _coco_file(tmp_path / "set" / "val.json", [{"id": 1, "file_name": "train_000000000007.jpg", "width": 40,
                                                "height": 20}],
               [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 0}],
               [{"id": 5, "name": "kite"}])
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco_json", train_json=str(tmp_path / "set/train.json"), val_json=str(tmp_path / "set/val.json"))
    _one_line_error(excinfo, "category 5")
    (tmp_path / "set" / "train_000000000003.jpg").unlink()
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("coco_json", train_json=str(tmp_path / "set/train.json"),
                      val_json=str(tmp_path / "set/train.json"))
    _one_line_error(excinfo, "train_000000000003.jpg")


def test_detection_image_of_another_size_is_refused(tmp_path):
    _write_coco(tmp_path / "coco")
    _rgb(8, 8, 0).save(tmp_path / "coco" / "train2017" / "train_000000000003.jpg")
    data = build_dataset("coco", root=str(tmp_path / "coco"), image_size=16)
    with pytest.raises(ConfigError) as excinfo:
        data.train[0]
    _one_line_error(excinfo, "8x8", "20x40")


def test_detection_files_batch_through_make_loader(tmp_path):
    _write_coco(tmp_path / "coco")
    data = build_dataset("coco", root=str(tmp_path / "coco"), image_size=16)
    batches = list(make_loader(data.test, 2, shuffle=False, placement=Placement(num_workers=2)))
    images, targets, indices = batches[0]
    assert images.shape == (2, 3, 16, 16) and indices.tolist() == [0, 1] and len(batches) == 2
    assert [len(t["labels"]) for t in targets] == [1, 2] and batches[1][1][0]["boxes"].shape == (0, 4)
    torch.testing.assert_close(images[1], data.test[1][0])

# ---------------------------------------------------------------- a folder of images and masks


def _write_mask_folder(root, values=(0, 1, 2)):
    masks = {}
    for split, stems in (("train", ["a", "b", "c"]), ("val", ["d"])):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for k, stem in enumerate(stems):
            suffix = ".png" if k % 2 else ".jpg"
            _rgb(20, 12, k).save(root / "images" / split / f"{stem}{suffix}")
            mask = np.full((12, 20), values[0], dtype=np.uint8)
            mask[2:8, 4:12] = values[1 + k % 2]
            mask[0, :] = 255
            Image.fromarray(mask).save(root / "masks" / split / f"{stem}.png")
            masks[(split, stem)] = mask
    return masks


def test_mask_folder_items_and_ignore(tmp_path):
    masks = _write_mask_folder(tmp_path / "folder")
    data = build_dataset("mask_folder", root=str(tmp_path / "folder"), image_size=16,
                         cache_dir=str(tmp_path / "cache"))
    assert data.num_classes == 3 and data.class_names == ("0", "1", "2") and len(data.train) == 3
    image, mask, _ = data.train[1]
    expected = torch.from_numpy(_nearest(masks[("train", "b")], 16).astype(np.int64))
    expected[expected == 255] = -1
    assert torch.equal(mask, expected) and mask[0].eq(-1).all()
    source = Image.open(tmp_path / "folder/images/train/b.png")
    torch.testing.assert_close(image, _normalised(source, 16), rtol=1e-5, atol=1e-5)
    named = build_dataset("mask_folder", root=str(tmp_path / "folder"), image_size=16, cache_dir=str(tmp_path / "c"),
                          class_names=["sky", "tree", "road", "car"])
    assert named.num_classes == 4 and named.class_names[3] == "car"


def test_mask_folder_custom_ignore_index(tmp_path):
    _write_mask_folder(tmp_path / "folder", values=(7, 0, 1))  # 7: unlabelled
    with pytest.raises(ConfigError) as excinfo:  # 255 is then an undeclared value
        build_dataset("mask_folder", root=str(tmp_path / "folder"), image_size=16, cache_dir=str(tmp_path / "c"),
                      ignore_index=7, class_names=["a", "b"])
    _one_line_error(excinfo, "255", "a.png")
    for path in (tmp_path / "folder" / "masks").rglob("*.png"):
        values = np.asarray(Image.open(path)).copy()
        values[values == 255] = 7
        Image.fromarray(values).save(path)
    data = build_dataset("mask_folder", root=str(tmp_path / "folder"), image_size=16, cache_dir=str(tmp_path / "c2"),
                         ignore_index=7)
    assert data.num_classes == 2 and data.train[1][1].eq(-1).any() and int(data.train[1][1].max()) == 1


def test_mask_folder_errors(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("mask_folder", root=str(tmp_path / "none"))
    _one_line_error(excinfo, "data.options.root", "images")
    _write_mask_folder(tmp_path / "folder")
    options = dict(root=str(tmp_path / "folder"), image_size=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as excinfo:  # value 2 with two class names
        build_dataset("mask_folder", class_names=["x", "y"], **options)
    _one_line_error(excinfo, "b.png", "[2]")
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("mask_folder", ignore_index=1, **options)
    _one_line_error(excinfo, "data.options.ignore_index")
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tmp_path / "folder/masks/val/d.png")  # a colour mask
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("mask_folder", **options)
    _one_line_error(excinfo, "d.png", "mode RGB")
    (tmp_path / "folder/masks/val/d.png").unlink()
    with pytest.raises(ConfigError) as excinfo:
        build_dataset("mask_folder", **options)
    _one_line_error(excinfo, "d has no image or no mask")


def test_mask_folder_trains_a_segmenter(tmp_path):
    _write_mask_folder(tmp_path / "folder")
    data = build_dataset("mask_folder", root=str(tmp_path / "folder"), image_size=32,
                         cache_dir=str(tmp_path / "cache"))
    student = create_model("seg:tiny", num_classes=data.num_classes, width=4)
    teacher = create_model("seg:tiny", num_classes=data.num_classes, width=4)
    distiller = Distiller(student, teacher, [], example_input=input_example(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=2, lr=0.01, progress=False, device="cpu"),
                 verbose=False)
    row = result.history[-1]
    assert np.isfinite(row["train_loss"]) and "test_miou" in row


def test_datasets_are_registered_as_dense():
    from kdzoo.registry import DATASETS
    for name in ("voc", "cityscapes", "coco", "mask_folder", "coco_json"):
        entry = DATASETS.get(name)
        assert entry.meta["family"] == "dense" and entry.paper
        meanings = entry.option_meanings()
        assert set(meanings) == set(entry.defaults), name
