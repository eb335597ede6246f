//! Vision on the real models: the converted detector and classifier from `assets/models`
//! (onnx/make_models.sh), run by ONNX Runtime on darknet's photos (onnx/fetch_testdata.sh) and on
//! images made here; plus the decoder's refusals of hostile or broken input.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use deskgen::inference::vision::{
    CaptionError, Captioner, GenerationOptions, Hed, ImageError, OcrConfig, SceneAnalysis, TextLine, Vision,
    VisionConfig, VisionError, canny, compose_caption, decode_image,
};
use deskgen::inference::{Runtime, RuntimeConfig};
use image::{ImageFormat, Rgb, RgbImage};
use sha2::{Digest, Sha256};

const MAX_PIXELS: u64 = 40_000_000;
/// The darknet photos, none of which shows a desk.
const DARKNET: &[&str] = &["dog.jpg", "person.jpg", "horses.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> VisionConfig {
    let models = root().join("assets/models");
    VisionConfig {
        detector: models.join("detector.onnx"),
        oid_detector: models.join("oidv4_detector.onnx"),
        oid_labels: models.join("oidv4_labels.txt"),
        classifier: models.join("classifier.onnx"),
        classifier_labels: models.join("imagenet_labels.txt"),
        ocr: Some(OcrConfig {
            detector: models.join("ocr_det.onnx"),
            classifier: models.join("ocr_cls.onnx"),
            recognizer: models.join("ocr_rec.onnx"),
            ..OcrConfig::default()
        }),
        ..VisionConfig::default()
    }
}

/// The vision models, loaded once; running them takes `&mut`, so tests take turns.
fn vision() -> MutexGuard<'static, Vision> {
    static VISION: LazyLock<Mutex<Vision>> = LazyLock::new(|| {
        let runtime = Runtime::init(&RuntimeConfig::default()).expect("ONNX Runtime (run onnx/fetch_ort.sh)");
        Mutex::new(Vision::load(&runtime, &config()).expect("vision models (run onnx/make_models.sh)"))
    });
    VISION.lock().unwrap_or_else(PoisonError::into_inner)
}

fn photo(name: &str) -> RgbImage {
    let path: PathBuf = root().join("assets/testdata/darknet").join(name);
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run onnx/fetch_testdata.sh)", path.display()));
    decode_image(&bytes, MAX_PIXELS).expect("darknet photos decode")
}

fn encode(image: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), format).expect("encode");
    bytes
}

fn score_of(analysis: &SceneAnalysis, label: &str) -> f32 {
    analysis.detections.iter().filter(|d| d.label == label).map(|d| d.score).fold(0.0, f32::max)
}

#[test]
fn dog_photo_detects_bicycle_dog_and_car_where_they_are() {
    let analysis = vision().analyze(&photo("dog.jpg")).unwrap();
    assert!(score_of(&analysis, "bicycle") > 0.9, "{:?}", analysis.detections);
    assert!(score_of(&analysis, "dog") > 0.75, "{:?}", analysis.detections);
    assert!(score_of(&analysis, "car") > 0.5, "{:?}", analysis.detections);
    // The dog sits in the lower left, the car in the upper right.
    let dog = analysis.detections.iter().find(|d| d.label == "dog").unwrap();
    let [x_min, y_min, x_max, y_max] = dog.bbox;
    assert!(x_min < 0.25 && x_max < 0.5 && y_min > 0.3 && y_max > 0.85, "dog at {:?}", dog.bbox);
    let car = analysis.detections.iter().find(|d| d.label == "car").unwrap();
    assert!(car.bbox[0] > 0.5 && car.bbox[3] < 0.35, "car at {:?}", car.bbox);
    for d in &analysis.detections {
        assert!(d.score >= VisionConfig::default().min_detection_score, "{d:?}");
        assert!(d.bbox[0] <= d.bbox[2] && d.bbox[1] <= d.bbox[3], "{d:?}");
    }
    assert!(analysis.detections.windows(2).all(|w| w[0].score >= w[1].score));
}

#[test]
fn classifier_names_a_dog_breed_for_the_dog_photo() {
    let analysis = vision().analyze(&photo("dog.jpg")).unwrap();
    let labels = std::fs::read_to_string(config().classifier_labels).unwrap();
    let index = labels.lines().position(|l| l == analysis.top_classes[0].label).unwrap();
    // ImageNet's dog breeds are classes 151 to 268.
    assert!((151..=268).contains(&index), "top class {:?}", analysis.top_classes[0]);
    assert!(analysis.top_classes[0].probability > 0.2);
    assert_eq!(analysis.top_classes.len(), 5);
    assert!(analysis.top_classes.windows(2).all(|w| w[0].probability >= w[1].probability));
}

#[test]
fn darknet_photos_are_not_desks() {
    for name in DARKNET {
        let analysis = vision().analyze(&photo(name)).unwrap();
        assert!(!analysis.is_desk, "{name} taken for a desk: {analysis:?}");
        assert!(analysis.desk_score < 0.3, "{name}: desk score {}", analysis.desk_score);
    }
}

#[test]
fn person_and_horses_are_found() {
    let person = vision().analyze(&photo("person.jpg")).unwrap();
    assert!(score_of(&person, "person") > 0.8, "{:?}", person.detections);
    assert!(score_of(&person, "horse") > 0.5 || score_of(&person, "dog") > 0.5, "{:?}", person.detections);
    let horses = vision().analyze(&photo("horses.jpg")).unwrap();
    assert!(horses.detections.iter().filter(|d| d.label == "horse").count() >= 3, "{:?}", horses.detections);
}

#[test]
fn a_blank_synthetic_image_has_no_desk_and_no_objects() {
    let image = RgbImage::from_fn(320, 240, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let bytes = encode(&image.into(), ImageFormat::Png);
    let decoded = decode_image(&bytes, MAX_PIXELS).unwrap();
    let analysis = vision().analyze(&decoded).unwrap();
    assert!(!analysis.is_desk, "{analysis:?}");
    assert!(analysis.detections.is_empty(), "{:?}", analysis.detections);
    assert!(analysis.items.is_empty(), "{:?}", analysis.items);
}

#[test]
fn caption_without_a_captioner_is_composed_from_the_analysis() {
    let image = photo("dog.jpg");
    let analysis = vision().analyze(&image).unwrap();
    let caption = vision().caption(&image, &analysis).unwrap();
    assert_eq!(caption, compose_caption(&analysis));
    assert!(caption.starts_with("a photo of a bicycle"), "{caption}");
    assert!(caption.contains("a dog"), "{caption}");
}

#[test]
fn models_report_the_loaded_files() {
    let models = vision().models();
    let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "ssd-mobilenet-v2-coco",
            "ssd-mobilenet-v2-oidv4",
            "efficientnet-lite3",
            "pp-ocrv4-det",
            "ppocr-mobile-v2-cls",
            "pp-ocrv4-rec"
        ]
    );
    for model in &models {
        let bytes = std::fs::read(&model.path).unwrap();
        assert_eq!(model.size_bytes, bytes.len() as u64);
        assert_eq!(model.sha256, hex::encode(Sha256::digest(&bytes)));
    }
    assert!(models[0].inputs[0].starts_with("image_tensor:0"), "{:?}", models[0].inputs);
    assert_eq!(models[0].outputs.len(), 4);
    assert!(models[1].inputs[0].contains("300, 300, 3"), "{:?}", models[1].inputs);
    assert_eq!(models[1].outputs.len(), 2);
    assert!(models[2].inputs[0].contains("280, 280, 3"), "{:?}", models[2].inputs);
}

#[test]
fn a_missing_model_names_the_file_and_how_to_build_it() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let missing = root().join("assets/models/no-such-detector.onnx");
    let config = VisionConfig { detector: missing.clone(), ..config() };
    let error = Vision::load(&runtime, &config).err().expect("loading must fail");
    assert!(matches!(&error, VisionError::MissingModel { path, .. } if *path == missing), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("no-such-detector.onnx") && message.contains("make models"), "{message}");
}

#[test]
fn missing_ocr_models_are_named_at_load() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let missing = root().join("assets/models/no-such-recognizer.onnx");
    let ocr = OcrConfig { recognizer: missing.clone(), ..config().ocr.unwrap() };
    let error =
        Vision::load(&runtime, &VisionConfig { ocr: Some(ocr), ..config() }).err().expect("must fail");
    assert!(matches!(&error, VisionError::MissingModel { path, .. } if *path == missing), "{error:?}");
    assert!(error.to_string().contains("make models"), "{error}");
}

/// Out of time after detection: the lines found are counted as unread, none is made up.
#[test]
fn reading_that_runs_out_of_time_reports_the_lines_it_did_not_read() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let ocr = OcrConfig { timeout: Duration::ZERO, ..config().ocr.unwrap() };
    let mut vision = Vision::load(&runtime, &VisionConfig { ocr: Some(ocr), ..config() }).unwrap();
    let image = image::open(fixtures().join("reference/ocr/dog-logitech.png")).unwrap().to_rgb8();
    let reading = vision.read_text(&image).unwrap().unwrap();
    assert_eq!((reading.lines.len(), reading.unread), (0, 4), "{reading:?}");
}

#[test]
fn non_image_bytes_are_refused() {
    let error = decode_image(b"<html>not found</html>", MAX_PIXELS).unwrap_err();
    assert!(matches!(error, ImageError::NotAnImage), "{error:?}");
    assert!(matches!(decode_image(&[], MAX_PIXELS), Err(ImageError::NotAnImage)));
}

#[test]
fn truncated_jpeg_is_refused() {
    let image = RgbImage::from_fn(256, 256, |x, y| {
        Rgb([(x * 7 % 256) as u8, (y * 3 % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let bytes = encode(&image.into(), ImageFormat::Jpeg);
    assert!(decode_image(&bytes, MAX_PIXELS).is_ok());
    for cut in [bytes.len() / 3, bytes.len() - 2, 200] {
        let error = decode_image(&bytes[..cut], MAX_PIXELS).err();
        assert!(matches!(error, Some(ImageError::Corrupt { format: "jpg", .. })), "cut at {cut}: {error:?}");
    }
}

#[test]
fn tiny_images_are_refused() {
    let one = encode(&RgbImage::new(1, 1).into(), ImageFormat::Png);
    assert!(matches!(decode_image(&one, MAX_PIXELS), Err(ImageError::TooSmall { width: 1, height: 1 })));
    let thin = encode(&RgbImage::new(640, 16).into(), ImageFormat::Png);
    assert!(matches!(decode_image(&thin, MAX_PIXELS), Err(ImageError::TooSmall { width: 640, height: 16 })));
    let smallest = encode(&RgbImage::new(32, 32).into(), ImageFormat::Png);
    assert_eq!(decode_image(&smallest, MAX_PIXELS).unwrap().dimensions(), (32, 32));
}

/// A PNG chunk: length, type, data, CRC-32 of type and data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xffff_ffffu32;
    for &byte in kind.iter().chain(data) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc).to_be_bytes());
    chunk
}

#[test]
fn decompression_bomb_is_refused_from_its_header() {
    // A 100000x100000 RGB PNG header with a token of data: 30 GB if anyone tried to decode it.
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(png_chunk(b"IEND", &[]));

    let started = Instant::now();
    let error = decode_image(&png, MAX_PIXELS).unwrap_err();
    assert!(
        matches!(error, ImageError::TooLarge { width: 100_000, height: 100_000, pixels: 10_000_000_000, .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(error.to_string().contains("100000x100000"), "{error}");
}

#[test]
fn pixel_cap_applies_to_ordinary_images() {
    let bytes = encode(&RgbImage::new(200, 100).into(), ImageFormat::Png);
    assert!(matches!(decode_image(&bytes, 19_999), Err(ImageError::TooLarge { pixels: 20_000, .. })));
    assert!(decode_image(&bytes, 20_000).is_ok());
}

#[test]
fn grayscale_and_16_bit_images_become_rgb() {
    let gray = image::GrayImage::from_fn(64, 48, |x, _| image::Luma([(x * 4) as u8]));
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let decoded = decode_image(&encode(&gray.clone().into(), format), MAX_PIXELS).unwrap();
        assert_eq!(decoded.dimensions(), (64, 48));
        let Rgb([r, g, b]) = *decoded.get_pixel(40, 10);
        assert!(r == g && g == b && r.abs_diff(160) <= 4, "{format:?}: {r} {g} {b}");
    }
    let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(40, 40, image::Rgb([65535, 32768, 0]));
    let decoded = decode_image(&encode(&deep.into(), ImageFormat::Png), MAX_PIXELS).unwrap();
    assert_eq!(*decoded.get_pixel(0, 0), Rgb([255, 128, 0]));
}

/// A 40x40 pure red CMYK JPEG (Adobe APP14, inverted CMYK) made by Pillow:
/// `Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path, quality=90)`.
const CMYK_JPEG: &str = concat!(
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwADAgIDAgIDAwMDBAMDBAUIBQUEBAUKBwcGCAwKDAwLCgsLDQ4SEA0OEQ4LCxAWEBETFBUV",
    "FQwPFxgWFBgSFBUU/8AAFAgAKAAoBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIB",
    "AwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZH",
    "SElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV",
    "1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwD9U6/Kqvyqr9U6KKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK",
    "KKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK/9k=",
);

#[test]
fn cmyk_jpeg_becomes_rgb() {
    let bytes = base64::engine::general_purpose::STANDARD.decode(CMYK_JPEG).unwrap();
    let decoded = decode_image(&bytes, MAX_PIXELS).unwrap();
    assert_eq!(decoded.dimensions(), (40, 40));
    let Rgb([r, g, b]) = *decoded.get_pixel(20, 20);
    assert!(r > 230 && g < 30 && b < 30, "expected red, got {r} {g} {b}");
}

#[test]
fn transparent_png_is_composited_over_white() {
    let rgba = image::RgbaImage::from_fn(64, 64, |x, _| {
        if x < 32 { image::Rgba([200, 0, 0, 255]) } else { image::Rgba([0, 0, 0, 0]) }
    });
    let decoded = decode_image(&encode(&rgba.into(), ImageFormat::Png), MAX_PIXELS).unwrap();
    assert_eq!(*decoded.get_pixel(10, 10), Rgb([200, 0, 0]));
    assert_eq!(*decoded.get_pixel(50, 10), Rgb([255, 255, 255]));
}

/// An APP1 Exif segment holding only an orientation tag.
fn exif_orientation_segment(orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend(tiff);
    let mut segment = vec![0xff, 0xe1];
    segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    segment.extend(payload);
    segment
}

#[test]
fn exif_rotated_jpeg_is_decoded_upright() {
    // Stored sideways: 96 wide, 48 tall, red on the left, blue on the right. Orientation 6 says
    // "rotate 90 degrees clockwise to display", which puts the left (red) side on top.
    let stored =
        RgbImage::from_fn(96, 48, |x, _| if x < 48 { Rgb([220, 20, 20]) } else { Rgb([20, 20, 220]) });
    let jpeg = encode(&stored.into(), ImageFormat::Jpeg);
    let mut bytes = jpeg[..2].to_vec(); // SOI
    bytes.extend(exif_orientation_segment(6));
    bytes.extend_from_slice(&jpeg[2..]);

    let decoded = decode_image(&bytes, MAX_PIXELS).unwrap();
    assert_eq!(decoded.dimensions(), (48, 96));
    let top = decoded.get_pixel(24, 10).0;
    let bottom = decoded.get_pixel(24, 86).0;
    assert!(top[0] > 180 && top[2] < 80, "top should be red: {top:?}");
    assert!(bottom[2] > 180 && bottom[0] < 80, "bottom should be blue: {bottom:?}");
}

/// The tiny random-weight captioner and the token ids transformers generated with it.
fn fixtures() -> PathBuf {
    root().join("onnx/fixtures")
}

/// Reads a little-endian `.npy` array of `f4` or `i8` values as f64, with its shape.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text.split(',').filter_map(|d| d.trim().parse().ok()).collect();
    let data = &bytes[10 + header_len..];
    let values = if header.contains("'<f4'") {
        data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
    } else if header.contains("'<i8'") {
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else {
        panic!("{}: unsupported dtype in {header}", path.display())
    };
    (shape, values)
}

fn reference_pixels() -> ndarray::Array4<f32> {
    let (shape, values) = read_npy(&fixtures().join("reference/captioner/pixel_values.npy"));
    let values = values.into_iter().map(|v| v as f32).collect();
    ndarray::Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), values).unwrap()
}

fn reference_tokens(name: &str) -> Vec<i64> {
    let (_, values) = read_npy(&fixtures().join("reference/captioner").join(name));
    values.into_iter().map(|v| v as i64).collect()
}

/// The options the reference was generated with.
fn reference_options(num_beams: usize) -> GenerationOptions {
    GenerationOptions {
        num_beams,
        max_new_tokens: 16,
        min_new_tokens: 8,
        length_penalty: 1.0,
        early_stopping: false,
    }
}

fn captioner(dir: &Path) -> Captioner {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    Captioner::load(&runtime, dir).unwrap()
}

#[test]
fn captioner_greedy_and_beam_search_match_transformers() {
    let mut captioner = captioner(&fixtures().join("tiny-captioner"));
    let pixels = reference_pixels();
    let greedy = captioner.generate(&pixels, &reference_options(1)).unwrap();
    assert_eq!(greedy, reference_tokens("token_ids_greedy.npy"));
    let beam = captioner.generate(&pixels, &reference_options(3)).unwrap();
    assert_eq!(beam, reference_tokens("token_ids_beam3.npy"));
    // The two searches part ways, so the beam test is not greedy in disguise.
    assert_ne!(greedy, beam);
}

#[test]
fn captioner_with_split_decoders_matches_the_merged_one() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-captioner")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "decoder_model_merged.onnx" {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut captioner = captioner(dir.path());
    let ids: Vec<&str> = captioner.models().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        ["captioner-encoder-model", "captioner-decoder-model", "captioner-decoder-with-past-model"]
    );
    let pixels = reference_pixels();
    assert_eq!(
        captioner.generate(&pixels, &reference_options(1)).unwrap(),
        reference_tokens("token_ids_greedy.npy")
    );
    assert_eq!(
        captioner.generate(&pixels, &reference_options(3)).unwrap(),
        reference_tokens("token_ids_beam3.npy")
    );
}

#[test]
fn captioner_preprocessing_matches_the_image_processor() {
    let captioner = captioner(&fixtures().join("tiny-captioner"));
    let bytes = std::fs::read(fixtures().join("reference/init_image.png")).unwrap();
    let image = decode_image(&bytes, MAX_PIXELS).unwrap();
    let ours = captioner.preprocess(&image);
    let reference = reference_pixels();
    assert_eq!(ours.shape(), reference.shape());
    let worst = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    // One 8-bit level is 2/255 after normalising to [-1, 1]: resampling may round differently.
    assert!(worst <= 2.0 / 255.0 + 1e-6, "max difference {worst}");
}

#[test]
fn captioner_defaults_come_from_generation_config_and_caption_decodes_tokens() {
    let mut captioner = captioner(&fixtures().join("tiny-captioner"));
    let defaults = captioner.default_options();
    assert_eq!((defaults.num_beams, defaults.max_new_tokens, defaults.min_new_tokens), (1, 16, 0));
    let bytes = std::fs::read(fixtures().join("reference/init_image.png")).unwrap();
    let image = decode_image(&bytes, MAX_PIXELS).unwrap();
    // From the photo itself (our preprocessing) to the text of transformers' tokens.
    let caption = captioner.caption(&image, &reference_options(1)).unwrap();
    let tokenizer =
        tokenizers::Tokenizer::from_file(fixtures().join("tiny-captioner/tokenizer.json")).unwrap();
    let ids: Vec<u32> = reference_tokens("token_ids_greedy.npy").iter().map(|&t| t as u32).collect();
    assert_eq!(caption, tokenizer.decode(&ids, true).unwrap().trim());
    assert!(!caption.is_empty());
}

#[test]
fn captioner_directory_without_the_layout_is_a_clear_error() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let error = Captioner::load(&runtime, dir.path()).err().expect("an empty directory is no captioner");
    assert!(matches!(error, CaptionError::Missing { .. }), "{error:?}");
    assert!(error.to_string().contains("generation_config.json"), "{error}");
}

#[test]
fn vision_with_a_captioner_captions_with_it_and_lists_its_models() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let config = VisionConfig {
        captioner: Some(fixtures().join("tiny-captioner")),
        caption_max_tokens: Some(5),
        ..config()
    };
    let mut vision = Vision::load(&runtime, &config).unwrap();
    let ids: Vec<String> = vision.models().into_iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        [
            "ssd-mobilenet-v2-coco",
            "ssd-mobilenet-v2-oidv4",
            "efficientnet-lite3",
            "captioner-encoder-model",
            "captioner-decoder-model-merged",
            "pp-ocrv4-det",
            "ppocr-mobile-v2-cls",
            "pp-ocrv4-rec"
        ]
    );
    let image = photo("dog.jpg");
    let analysis = vision.analyze(&image).unwrap();
    let expected = captioner(&fixtures().join("tiny-captioner"))
        .caption(&image, &GenerationOptions { max_new_tokens: 5, min_new_tokens: 0, ..reference_options(1) })
        .unwrap();
    assert_eq!(vision.caption(&image, &analysis).unwrap(), expected);
    assert_ne!(expected, compose_caption(&analysis));
}

/// Edge pixels of `ours` against `reference`: (differing pixels, precision, recall, F1).
fn edge_agreement(ours: &image::GrayImage, reference: &image::GrayImage) -> (usize, f64, f64, f64) {
    let (mut both, mut only_ours, mut only_reference) = (0usize, 0usize, 0usize);
    for (a, b) in ours.pixels().zip(reference.pixels()) {
        match (a.0[0] != 0, b.0[0] != 0) {
            (true, true) => both += 1,
            (true, false) => only_ours += 1,
            (false, true) => only_reference += 1,
            (false, false) => {}
        }
    }
    let ratio = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
    let precision = ratio(both, both + only_ours);
    let recall = ratio(both, both + only_reference);
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    (only_ours + only_reference, precision, recall, f1)
}

/// Each case of onnx/fixtures/reference/canny: a photo's crop through our Canny against OpenCV's map.
/// JPEG decoders differ by a few levels here and there (PIL's libjpeg-turbo and the image crate do),
/// which moves some edges, so the maps must agree closely; where the decoded crop is PIL's to the
/// byte (the stored lossless decoding), they must be equal.
#[test]
fn canny_edges_match_opencv_on_real_photos() {
    let dir = fixtures().join("reference/canny");
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("run onnx/make_fixtures.sh canny");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let cases = doc["cases"].as_array().expect("cases.json lists cases");
    let mut exact_cases = 0;
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let input_path = root().join(case["input"].as_str().unwrap());
        let bytes = std::fs::read(&input_path)
            .unwrap_or_else(|e| panic!("{}: {e} (run onnx/fetch_testdata.sh)", input_path.display()));
        let decoded = decode_image(&bytes, MAX_PIXELS).expect("the inputs decode");
        let crop = |key: &str| u32::try_from(case["crop"][key].as_u64().unwrap()).unwrap();
        let input = image::imageops::crop_imm(&decoded, crop("x"), crop("y"), crop("width"), crop("height"))
            .to_image();
        let same_input = case["crop_rgb_sha256"] == hex::encode(Sha256::digest(input.as_raw()));
        let threshold = |key: &str| case[key].as_f64().unwrap() as f32;
        let ours = canny(&input, threshold("low_threshold"), threshold("high_threshold"));
        let reference = image::open(dir.join(file)).unwrap().to_luma8();
        assert_eq!(ours.dimensions(), reference.dimensions(), "{file}");
        let (differing, precision, recall, f1) = edge_agreement(&ours, &reference);
        eprintln!(
            "{file}: {differing} pixels differ from OpenCV {} (precision {precision:.4}, recall {recall:.4}, \
             F1 {f1:.4}; input decoded as PIL did: {same_input})",
            case["opencv"].as_str().unwrap_or("?"),
        );
        assert!(f1 >= 0.95, "{file}: F1 {f1:.4} against OpenCV");
        if same_input {
            assert_eq!(differing, 0, "{file}: same pixels as OpenCV's input, different edges");
            exact_cases += 1;
        }
    }
    assert!(exact_cases > 0, "no case had PIL's pixels, so none checked equality");
}

/// HED's soft-edge model (onnx/make_models.sh), loaded once; tests take turns running it.
fn hed() -> MutexGuard<'static, Hed> {
    static HED: LazyLock<Mutex<Hed>> = LazyLock::new(|| {
        let runtime = Runtime::init(&RuntimeConfig::default()).expect("ONNX Runtime (run onnx/fetch_ort.sh)");
        Mutex::new(
            Hed::load(&runtime, &root().join("assets/models/hed.onnx")).expect("run onnx/make_models.sh"),
        )
    });
    HED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The Keras model's outputs that onnx/convert_hed.py recorded when it converted hed.onnx.
fn hed_reference() -> (PathBuf, Vec<serde_json::Value>) {
    let dir = root().join("assets/models/hed-reference");
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("run onnx/make_models.sh");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let cases = doc["cases"].as_array().expect("cases.json lists cases").clone();
    assert_eq!(cases.len(), 3, "dog, horses and person");
    (dir, cases)
}

fn read_npy_4d(path: &Path) -> ndarray::Array4<f32> {
    let (shape, values) = read_npy(path);
    let shape = <[usize; 4]>::try_from(shape).expect("a 4-dimensional tensor");
    ndarray::Array4::from_shape_vec(shape, values.into_iter().map(|v| v as f32).collect()).unwrap()
}

fn max_abs_diff(a: &ndarray::Array4<f32>, b: &ndarray::Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn hed_onnx_matches_the_keras_model_on_real_photos() {
    let (dir, cases) = hed_reference();
    for case in &cases {
        let input = read_npy_4d(&dir.join(case["input"].as_str().unwrap()));
        let keras = read_npy_4d(&dir.join(case["edges"].as_str().unwrap()));
        let ours = hed().run_tensor(input.view()).unwrap();
        let worst = max_abs_diff(&ours, &keras);
        eprintln!(
            "{} {:?}: max |onnx - keras| = {worst:.3e}",
            case["photo"].as_str().unwrap(),
            input.shape()
        );
        assert!(worst <= 1e-4, "{}: max difference {worst}", case["photo"]);
    }
}

/// Our preprocessing of each photo against the tensor fed to Keras: equal where the image crate
/// decodes the JPEG to PIL's pixels, else off by the few levels the decoders differ by.
#[test]
fn hed_preprocessing_matches_the_tensors_fed_to_keras() {
    let (dir, cases) = hed_reference();
    for case in &cases {
        let photo = photo(case["photo"].as_str().unwrap().trim_start_matches("darknet/"));
        let same_pixels = case["rgb_sha256"] == hex::encode(Sha256::digest(photo.as_raw()));
        let ours = Hed::preprocess(&photo);
        let keras = read_npy_4d(&dir.join(case["input"].as_str().unwrap()));
        let worst = max_abs_diff(&ours, &keras);
        let mean =
            ours.iter().zip(&keras).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>() / ours.len() as f64;
        eprintln!("{}: max {worst}, mean {mean:.4} (decoded as PIL did: {same_pixels})", case["photo"]);
        if same_pixels {
            assert_eq!(worst, 0.0, "{}", case["photo"]);
        }
        // Swapped R and B would be off by tens of levels on average.
        assert!(mean < 1.0 && worst <= 16.0, "{}: max {worst}, mean {mean}", case["photo"]);
    }
}

#[test]
fn hed_soft_edges_of_the_dog_photo_are_white_edges_on_black() {
    let photo = photo("dog.jpg");
    let edges = hed().soft_edges(&photo).unwrap();
    assert_eq!(edges.dimensions(), photo.dimensions());
    assert!(edges.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]), "grey in three channels");
    let share = |keep: &dyn Fn(u8) -> bool| {
        edges.pixels().filter(|p| keep(p.0[0])).count() as f64 / f64::from(photo.width() * photo.height())
    };
    let (bright, dark) = (share(&|v| v > 200), share(&|v| v < 50));
    eprintln!("dog.jpg soft edges: {:.1}% > 200, {:.1}% < 50", bright * 100.0, dark * 100.0);
    // Keras gives 5.2% and 52%: the foliage and the deck's planks are full of edges.
    assert!((0.02..0.15).contains(&bright), "{bright}");
    assert!(dark > 0.45, "{dark}");

    // dog.jpg is under the model's largest side, so this is Keras' map rounded to 8 bits, up to
    // what the JPEG decoders make of the photo.
    let (dir, cases) = hed_reference();
    let keras = read_npy_4d(&dir.join(cases[0]["edges"].as_str().unwrap()));
    assert_eq!(cases[0]["photo"], "darknet/dog.jpg");
    let levels: Vec<f64> = edges
        .pixels()
        .zip(keras.iter())
        .map(|(ours, p)| (f64::from(ours.0[0]) - f64::from(p.clamp(0.0, 1.0) * 255.0).round()).abs())
        .collect();
    let mean = levels.iter().sum::<f64>() / levels.len() as f64;
    eprintln!(
        "dog.jpg: mean |ours - keras| {mean:.3} levels, max {}",
        levels.iter().fold(0.0, |a: f64, &b| a.max(b))
    );
    assert!(mean < 1.0, "mean difference from Keras {mean} levels");
}

/// A photo larger than the model's largest side runs shrunk; its edges come back at the photo's
/// size and in the right place.
#[test]
fn hed_soft_edges_of_a_large_image_come_back_at_its_size_and_place() {
    let (width, height) = (2048, 1536);
    let inside = |x: u32, y: u32| (512..1536).contains(&x) && (384..1152).contains(&y);
    let image =
        RgbImage::from_fn(width, height, |x, y| if inside(x, y) { Rgb([230; 3]) } else { Rgb([20; 3]) });
    let edges = hed().soft_edges(&image).unwrap();
    assert_eq!(edges.dimensions(), (width, height));
    let at = |x, y| edges.get_pixel(x, y).0[0];
    let border = [(512, 768), (1535, 768), (1024, 384), (1024, 1151)];
    let flat = [(1024, 768), (200, 200), (1800, 1300), (1024, 200)];
    eprintln!(
        "square's border {:?}, flat areas {:?}",
        border.map(|(x, y)| at(x, y)),
        flat.map(|(x, y)| at(x, y))
    );
    for (x, y) in border {
        assert!(at(x, y) > 200, "the square's border at ({x}, {y}) is {}", at(x, y));
    }
    for (x, y) in flat {
        assert!(at(x, y) < 50, "the flat area at ({x}, {y}) is {}", at(x, y));
    }
}

#[test]
fn hed_without_its_model_names_the_file_and_how_to_build_it() {
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let path = root().join("assets/models/no-such-hed.onnx");
    let error = Hed::load(&runtime, &path).err().expect("no model there");
    assert!(matches!(error, VisionError::MissingModel { .. }), "{error:?}");
    assert!(
        error.to_string().contains("no-such-hed.onnx") && error.to_string().contains("make models"),
        "{error}"
    );
}

/// The Open Images v4 detector against TensorFlow Lite running the model as shipped
/// (onnx/make_oidv4_reference.sh): the ONNX conversion's raw outputs, and MediaPipe's decoding of
/// them with its anchors, on three images.
#[test]
fn the_open_images_detector_matches_tensorflow_lite_and_mediapipes_decoding() {
    use deskgen::inference::vision::oid::{AnchorOptions, OidDetector, decode, read_labels, ssd_anchors};
    let text = std::fs::read_to_string(root().join("onnx/fixtures/reference/oidv4/cases.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let anchors = ssd_anchors(&AnchorOptions::oidv4());
    assert_eq!(anchors.len() as u64, reference["anchor_count"].as_u64().unwrap());
    let as_tuple = |a: &deskgen::inference::vision::oid::Anchor| [a.y_center, a.x_center, a.h, a.w];
    let listed =
        |key: &str| -> Vec<Vec<f32>> { reference[key].as_array().unwrap().iter().map(floats).collect() };
    let ours: Vec<[f32; 4]> =
        anchors.iter().take(4).chain(anchors.iter().skip(anchors.len() - 2)).map(as_tuple).collect();
    for (got, want) in ours.iter().zip(listed("first_anchors").iter().chain(listed("last_anchors").iter())) {
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "anchor {got:?} vs {want:?}");
    }
    let runtime = Runtime::init(&RuntimeConfig::default()).unwrap();
    let config = config();
    let labels = read_labels(&config.oid_labels).unwrap();
    let mut detector =
        OidDetector::new(runtime.session(&config.oid_detector).unwrap(), labels.clone()).unwrap();
    let mut report = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = image::open(root().join(case["input"].as_str().unwrap())).unwrap().to_rgb8();
        let raw = detector.raw(&input).unwrap();
        let mut worst = 0.0f32;
        for (k, anchor) in case["anchors"].as_array().unwrap().iter().enumerate() {
            let i = anchor.as_u64().unwrap() as usize;
            let boxes = floats(&case["box_encodings"][k]);
            let logits = floats(&case["class_predictions"][k]);
            for (a, b) in
                raw.box_encodings[i].iter().zip(&boxes).chain(raw.class_logits[i].iter().zip(&logits))
            {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(worst <= 1e-3, "{name}: raw outputs differ from TFLite's by {worst}");
        let found = decode(&raw, &anchors, &labels, 0.5);
        let want = case["detections"].as_array().unwrap();
        assert_eq!(found.len(), want.len(), "{name}: {found:?}");
        for (got, want) in found.iter().zip(want) {
            assert_eq!(got.label, want["label"].as_str().unwrap(), "{name}");
            assert!((got.score - want["score"].as_f64().unwrap() as f32).abs() < 1e-3, "{name}: {got:?}");
            let boxed = floats(&want["box"]);
            assert!(
                got.bbox.iter().zip(&boxed).all(|(a, b)| (a - b.clamp(0.0, 1.0)).abs() < 1e-3),
                "{name}: {got:?} vs {boxed:?}"
            );
        }
        report.push(format!("{name}: raw outputs within {worst:.1e}, {} detections", found.len()));
    }
    assert_eq!(report.len(), 3);
    println!("{}", report.join("\n"));
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Both detectors see darknet's dog photo (the Open Images one finds Dog, Bicycle and Car at
/// 0.74, 0.67 and 0.67): each object the two box alike is kept once, with the better score.
#[test]
fn both_detectors_run_and_the_same_object_is_kept_once() {
    let (analysis, [coco_ms, oid_ms, classify_ms]) = vision().analyze_timed(&photo("dog.jpg")).unwrap();
    assert!(coco_ms > 0.0 && oid_ms > 0.0 && classify_ms > 0.0);
    for label in ["dog", "bicycle"] {
        let seen: Vec<_> =
            analysis.detections.iter().filter(|d| d.label.eq_ignore_ascii_case(label)).collect();
        assert_eq!(seen.len(), 1, "one {label}, seen by both: {seen:?}");
        assert_eq!(seen[0].source, "ssd-mobilenet-v2-coco", "COCO's score is the better: {seen:?}");
    }
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

/// Spaces and case aside: PP-OCR often reads "DELL U2720Q" as "DELLU2720Q".
fn squeezed(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase()
}

/// rapidocr-onnxruntime's own pipeline read six images with 24 rendered strings (straight, tilted
/// by 4-6 degrees and upside down, on darknet photos and on white pages; onnx/ocr_reference.py).
/// Ours, on the same ONNX files, must read at least 95 % of its lines identically, each box
/// (upright bounds) at IoU >= 0.9 with its line's, add no more than 5 % lines of its own, and find
/// at least 95 % of the strings rendered (spaces and case aside).
#[test]
fn text_reading_matches_rapidocr_on_rendered_text() {
    let dir = fixtures().join("reference/ocr");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let (mut reference_lines, mut identical, mut ours_total, mut strings, mut found) = (0, 0, 0, 0, 0);
    let (mut worst_iou, mut worst_score) = (1.0f32, 0.0f32);
    let mut report = Vec::new();
    for case in &cases {
        let name = case["image"].as_str().unwrap();
        let image = image::open(dir.join(name)).unwrap().to_rgb8();
        let reading = vision().read_text(&image).expect("OCR is configured").unwrap();
        assert_eq!(reading.unread, 0, "{name}: timed out");
        let ours = &reading.lines;
        ours_total += ours.len();
        for line in case["lines"].as_array().unwrap() {
            reference_lines += 1;
            let corners: Vec<[f32; 2]> = line["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let p = floats(p);
                    [p[0], p[1]]
                })
                .collect();
            let want = TextLine {
                text: String::new(),
                score: 0.0,
                corners: [corners[0], corners[1], corners[2], corners[3]],
            };
            let text = line["text"].as_str().unwrap();
            let best = ours
                .iter()
                .max_by(|a, b| iou(a.bounds(), want.bounds()).total_cmp(&iou(b.bounds(), want.bounds())));
            match best {
                Some(got) if got.text == text && iou(got.bounds(), want.bounds()) >= 0.9 => {
                    identical += 1;
                    worst_iou = worst_iou.min(iou(got.bounds(), want.bounds()));
                    worst_score = worst_score.max((got.score - line["score"].as_f64().unwrap() as f32).abs());
                }
                got => {
                    report.push(format!("{name}: reference {text:?} at {:?}, ours {got:?}", want.bounds()))
                }
            }
        }
        for string in case["strings"].as_array().unwrap() {
            strings += 1;
            let text = squeezed(string["text"].as_str().unwrap());
            if ours.iter().any(|l| squeezed(&l.text) == text) {
                found += 1;
            } else {
                report.push(format!(
                    "{name}: rendered {text:?} not read; ours {:?}",
                    ours.iter().map(|l| &l.text).collect::<Vec<_>>()
                ));
            }
        }
    }
    println!(
        "{identical}/{reference_lines} reference lines identical (worst IoU {worst_iou:.3}, scores within {worst_score:.4}), {ours_total} lines of ours, {found}/{strings} rendered strings read\n{}",
        report.join("\n")
    );
    assert!(reference_lines >= 24, "{reference_lines}");
    assert!(identical as f64 >= 0.95 * reference_lines as f64, "{}", report.join("\n"));
    assert!(ours_total as f64 <= 1.05 * reference_lines as f64, "{ours_total} lines of ours");
    assert!(found as f64 >= 0.95 * strings as f64, "{}", report.join("\n"));
}
