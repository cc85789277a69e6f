//! Compression with reused contexts and bounded decompression.

use std::io::Read;

use flate2::Compression as GzLevel;

use crate::frame::CodecError;

/// Reusable compression state of one codec.
pub(crate) struct Compressors {
    zstd_c: Option<zstd::bulk::Compressor<'static>>,
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
}

/// zstd level: 1 is the fast end; messages are small and latency matters more than ratio.
const ZSTD_LEVEL: i32 = 1;
/// gzip level: 1 (fastest), for the same reason.
const GZIP_LEVEL: u32 = 1;

impl Compressors {
    pub(crate) fn new() -> Self {
        Compressors { zstd_c: None, zstd_d: None }
    }

    pub(crate) fn zstd(&mut self, src: &[u8], dst: &mut Vec<u8>) -> Result<(), CodecError> {
        if self.zstd_c.is_none() {
            let mut c =
                zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| CodecError::Compress(e.to_string()))?;
            c.include_contentsize(true).map_err(|e| CodecError::Compress(e.to_string()))?;
            self.zstd_c = Some(c);
        }
        let c = self.zstd_c.as_mut().ok_or_else(|| CodecError::Compress("no zstd context".into()))?;
        dst.clear();
        dst.reserve(zstd::zstd_safe::compress_bound(src.len()));
        c.compress_to_buffer(src, dst).map_err(|e| CodecError::Compress(e.to_string()))?;
        Ok(())
    }

    pub(crate) fn gzip(&mut self, src: &[u8], dst: &mut Vec<u8>) -> Result<(), CodecError> {
        use std::io::Write;
        dst.clear();
        let mut enc = flate2::write::GzEncoder::new(std::mem::take(dst), GzLevel::new(GZIP_LEVEL));
        enc.write_all(src).map_err(|e| CodecError::Compress(e.to_string()))?;
        *dst = enc.finish().map_err(|e| CodecError::Compress(e.to_string()))?;
        Ok(())
    }

    /// Decompresses zstd `src` into `dst`, at most `limit` bytes.
    pub(crate) fn unzstd(&mut self, src: &[u8], limit: usize, dst: &mut Vec<u8>) -> Result<(), CodecError> {
        dst.clear();
        match zstd::zstd_safe::get_frame_content_size(src) {
            Ok(Some(n)) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > limit {
                    return Err(CodecError::DecompressedTooLarge { max: limit });
                }
                if self.zstd_d.is_none() {
                    self.zstd_d = Some(
                        zstd::bulk::Decompressor::new().map_err(|e| CodecError::Decompress(e.to_string()))?,
                    );
                }
                let d =
                    self.zstd_d.as_mut().ok_or_else(|| CodecError::Decompress("no zstd context".into()))?;
                dst.reserve(n);
                d.decompress_to_buffer(src, dst).map_err(|e| CodecError::Decompress(e.to_string()))?;
                if dst.len() != n {
                    return Err(CodecError::Decompress("zstd content size disagrees with its header".into()));
                }
                Ok(())
            }
            // No declared size (a streaming producer): decode with a hard cap.
            Ok(None) => {
                let dec = zstd::stream::read::Decoder::new(src)
                    .map_err(|e| CodecError::Decompress(e.to_string()))?;
                bounded_read(dec, limit, dst)
            }
            Err(_) => Err(CodecError::Decompress("not a zstd frame".into())),
        }
    }

    /// Decompresses gzip `src` into `dst`, at most `limit` bytes.
    pub(crate) fn gunzip(&mut self, src: &[u8], limit: usize, dst: &mut Vec<u8>) -> Result<(), CodecError> {
        dst.clear();
        bounded_read(flate2::read::GzDecoder::new(src), limit, dst)
    }
}

fn bounded_read(r: impl Read, limit: usize, dst: &mut Vec<u8>) -> Result<(), CodecError> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    r.take(cap).read_to_end(dst).map_err(|e| CodecError::Decompress(e.to_string()))?;
    if dst.len() > limit {
        return Err(CodecError::DecompressedTooLarge { max: limit });
    }
    Ok(())
}
