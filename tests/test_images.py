"""Decoding one image file: every format and mode becomes RGB uint8, EXIF orientation is applied,
and the three resize policies give a square of the requested side."""

import io

import numpy as np
import pytest
from PIL import Image

from imgcls.data.images import fit_to_square, image_size_of, is_image_file, load_image, load_square

WIDTH, HEIGHT = 40, 20  # non-square on purpose: orientation and resize mistakes change the shape


def random_rgb(width=WIDTH, height=HEIGHT, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def stored(path):
    """The file as PIL opens it, before any conversion: (mode, size, info)."""
    with Image.open(path) as image:
        return image.mode, image.size, image.info


def as_array(path):
    return np.asarray(load_image(path))


def assert_rgb(image, width=WIDTH, height=HEIGHT):
    array = np.asarray(image)
    assert image.mode == "RGB"
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)


# --- orientation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", [6, 8])  # 6: rotate 90 clockwise, 8: 90 counter-clockwise
def test_exif_rotation_transposes_size(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    random_rgb().save(path, exif=exif)
    assert stored(path)[1] == (WIDTH, HEIGHT)  # stored as landscape
    image = load_image(path)
    assert_rgb(image, width=HEIGHT, height=WIDTH)  # shown as portrait


def test_exif_rotation_direction(tmp_path):
    # a white left column must end up on top (orientation 6) and at the bottom (orientation 8)
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:, :8] = 255
    rows = {}
    for orientation in (6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"rotated{orientation}.jpg"
        Image.fromarray(pixels).save(path, exif=exif, quality=95)
        loaded = as_array(path).astype(int)
        rows[orientation] = (loaded[:4].mean(), loaded[-4:].mean())
    assert rows[6][0] > 200 and rows[6][1] < 50
    assert rows[8][0] < 50 and rows[8][1] > 200


def test_no_exif_keeps_size(tmp_path):
    path = tmp_path / "plain.jpg"
    random_rgb().save(path)
    assert_rgb(load_image(path))


# --- modes and formats ---------------------------------------------------------------------------

def test_greyscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    random_rgb().convert("L").save(path)
    array = as_array(path)
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert np.array_equal(array[..., 0], np.asarray(random_rgb().convert("L")))


def test_rgba_transparent_pixels_become_white(tmp_path):
    pixels = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    pixels[..., 0] = 200  # red everywhere, but the left half fully transparent
    pixels[:, WIDTH // 2:, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    array = as_array(path)
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert (array[:, : WIDTH // 2] == 255).all()
    assert (array[:, WIDTH // 2:] == [200, 0, 0]).all()


def test_greyscale_with_alpha(tmp_path):
    pixels = np.zeros((HEIGHT, WIDTH, 2), dtype=np.uint8)  # black, transparent on the left half
    pixels[:, WIDTH // 2:, 1] = 255
    path = tmp_path / "la.png"
    Image.fromarray(pixels, "LA").save(path)
    array = as_array(path)
    assert (array[:, : WIDTH // 2] == 255).all() and (array[:, WIDTH // 2:] == 0).all()


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    original = random_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    original.save(path)
    assert stored(path)[0] == "P"
    array = as_array(path)
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(array, np.asarray(original.convert("RGB")))


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparent_index_becomes_white(tmp_path, suffix):
    image = Image.new("P", (WIDTH, HEIGHT), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), index 1 blue
    for x in range(WIDTH // 2, WIDTH):
        for y in range(HEIGHT):
            image.putpixel((x, y), 1)
    path = tmp_path / f"transparent{suffix}"
    image.save(path, transparency=0)
    assert "transparency" in stored(path)[2]
    array = as_array(path)
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert (array[:, : WIDTH // 2] == 255).all()  # transparent black shows as white, not black
    assert (array[:, WIDTH // 2:] == [0, 0, 255]).all()


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (WIDTH, HEIGHT), (255, 0, 0)).convert("CMYK").save(path, quality=95)
    assert stored(path)[0] == "CMYK"
    array = as_array(path).astype(int)
    assert array.shape == (HEIGHT, WIDTH, 3)
    # red stays red (PIL's naive CMYK conversion: no colour management, but no inverted colours)
    assert array[..., 0].mean() > 200 and array[..., 1].mean() < 60 and array[..., 2].mean() < 60


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path):
    values = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
    values[:, :10] = 65535
    values[:, 10:20] = 32768
    values[:, 20:30] = 200  # dark: must stay dark, not be read as 8-bit 200
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert stored(path)[0].startswith("I;16")
    array = as_array(path)
    assert array.dtype == np.uint8 and array.shape == (HEIGHT, WIDTH, 3)
    assert (array[:, :10] == 255).all()
    assert (np.abs(array[:, 10:20].astype(int) - 128) <= 1).all()
    assert (array[:, 20:30] <= 1).all()
    assert (array[:, 30:] == 0).all()


def test_sixteen_bit_dark_image_stays_dark(tmp_path):
    # every value below 256: a max-based guess would read this 16-bit image as 8-bit and brighten it 257x
    values = np.full((HEIGHT, WIDTH), 255, dtype=np.uint16)
    path = tmp_path / "dark.png"
    Image.fromarray(values).save(path)
    assert (as_array(path) <= 1).all()


def test_one_bit_image(tmp_path):
    pixels = np.zeros((HEIGHT, WIDTH), dtype=bool)
    pixels[:, WIDTH // 2:] = True
    path = tmp_path / "bits.png"
    Image.fromarray(pixels).convert("1").save(path)
    assert stored(path)[0] == "1"
    array = as_array(path)
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert set(np.unique(array)) == {0, 255}
    assert (array[:, WIDTH // 2:] == 255).all()


@pytest.mark.parametrize("suffix", [".webp", ".bmp", ".tif", ".tiff", ".gif", ".png", ".jpg", ".jpeg"])
def test_every_supported_format_gives_rgb(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    random_rgb().save(path)
    assert is_image_file(path)
    image = load_image(path)
    assert_rgb(image)
    assert image_size_of(path) == (WIDTH, HEIGHT)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff", ".webp"])
def test_lossless_formats_keep_pixels(tmp_path, suffix):
    original = random_rgb()
    path = tmp_path / f"image{suffix}"
    original.save(path, **({"lossless": True} if suffix == ".webp" else {}))
    assert np.array_equal(as_array(path), np.asarray(original))


def test_gif_reads_first_frame(tmp_path):
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    array = as_array(path)
    assert (array == [255, 0, 0]).all()


def test_is_image_file():
    assert is_image_file("a/b/PHOTO.JPG")
    assert is_image_file("scan.tiff")
    assert not is_image_file("notes.txt")
    assert not is_image_file("labels.csv")


# --- resize policies -----------------------------------------------------------------------------

@pytest.fixture
def wide_image():
    """80 x 20: red, with a green band on the left and right edges (10 px each)."""
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[:, :10] = (0, 255, 0)
    pixels[:, -10:] = (0, 255, 0)
    return Image.fromarray(pixels)


def green_columns(array):
    return (array[..., 1] > 128).any(axis=0)


@pytest.mark.parametrize("policy", ["crop", "pad", "squish"])
@pytest.mark.parametrize("size", [8, 16, 33])
@pytest.mark.parametrize("shape", [(80, 20), (20, 80), (30, 30), (5, 7), (300, 200)])
def test_every_policy_gives_square_uint8(policy, size, shape):
    array = fit_to_square(random_rgb(*shape), size, policy)
    assert array.shape == (size, size, 3)
    assert array.dtype == np.uint8


def test_crop_cuts_the_edges(wide_image):
    array = fit_to_square(wide_image, 16, "crop")
    assert not green_columns(array).any()  # the edges are gone
    assert (array[..., 0] > 200).all()  # and no black border was added


def test_pad_keeps_everything_with_black_border(wide_image):
    array = fit_to_square(wide_image, 16, "pad").astype(int)
    # 80 x 20 -> 16 x 4, pasted in the middle rows: 6 black rows above and below
    assert (array[:6] == 0).all() and (array[-6:] == 0).all()
    assert (array[6:10].sum(axis=2) > 0).all()
    assert green_columns(array[6:10])[0] and green_columns(array[6:10])[-1]  # both edges kept


def test_squish_stretches_without_cutting_or_padding(wide_image):
    array = fit_to_square(wide_image, 16, "squish").astype(int)
    assert (array.sum(axis=2) > 100).all()  # no black border
    columns = green_columns(array)
    assert columns[0] and columns[-1]  # both edges kept
    assert not columns[6:10].any()  # the red middle stays red
    assert (green_columns(array[:1]) == green_columns(array[-1:])).all()  # every row looks the same


def test_pad_tall_image_has_side_borders():
    tall = Image.new("RGB", (20, 80), (255, 255, 255))
    array = fit_to_square(tall, 16, "pad")
    assert (array[:, :6] == 0).all() and (array[:, -6:] == 0).all()
    assert (array[:, 6:10] == 255).all()


def test_square_image_is_only_resized_by_every_policy():
    image = Image.new("RGB", (30, 30), (10, 20, 30))
    for policy in ("crop", "pad", "squish"):
        assert (fit_to_square(image, 12, policy) == [10, 20, 30]).all()


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="crop, pad or squish"):
        fit_to_square(random_rgb(), 16, "zoom")


def test_load_square_applies_orientation_then_policy(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[...] = 255
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    array = load_square(path, 16, "pad").astype(int)
    # shown as 20 wide x 80 tall: the black borders are left and right, not top and bottom
    assert array[:, :5].max() < 30 and array[:, -5:].max() < 30
    assert array[:, 7:9].min() > 200


def test_load_square_large_jpeg_uses_draft_and_keeps_size(tmp_path):
    path = tmp_path / "large.jpg"
    random_rgb(800, 600).save(path)
    assert load_square(path, 32, "crop").shape == (32, 32, 3)


# --- broken files --------------------------------------------------------------------------------

def jpeg_bytes():
    buffer = io.BytesIO()
    random_rgb(64, 64).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_truncated_jpeg_raises(tmp_path):
    path = tmp_path / "truncated.jpg"
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        load_image(path)
    with pytest.raises(OSError):
        load_square(path, 16)


def test_zero_byte_file_raises(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError
        load_image(path)
    assert image_size_of(path) is None


def test_text_file_named_jpg_raises(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(OSError):
        load_square(path, 16)
    assert image_size_of(path) is None
