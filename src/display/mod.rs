//! Display output: frames captured from a head, encoded as PNG, and shown live to viewers
//! ([`service`]): over RFB ([`rfb`]), also to browsers through noVNC over WebSocket ([`web`]).

pub mod config;
pub mod rfb;
pub mod service;
pub mod web;

use vgpu_model::Frame;

/// Encodes a captured frame as an 8-bit RGB PNG.
pub fn encode_png(frame: &Frame) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, frame.width, frame.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&frame.to_rgb8())?;
    writer.finish()?;
    Ok(out)
}

/// Decodes an 8-bit RGB or RGBA PNG into (width, height, RGB bytes); for tests and tools.
pub fn decode_png_rgb(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), png::DecodingError> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    let rgb = match info.color_type {
        png::ColorType::Rgba => buf
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        _ => buf,
    };
    Ok((info.width, info.height, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_model::PixelFormat;

    #[test]
    fn png_round_trips_pixels() {
        let frame = Frame {
            width: 2,
            height: 1,
            format: PixelFormat::Xrgb8888,
            data: vec![3, 2, 1, 0, 6, 5, 4, 0],
        };
        let png = encode_png(&frame).unwrap();
        assert_eq!(
            decode_png_rgb(&png).unwrap(),
            (2, 1, vec![1, 2, 3, 4, 5, 6])
        );
    }
}
