//! The MessagePack codec (rmp-serde): the same message fields as oslo's JSON, as one
//! MessagePack map with no envelope. Structs are written as maps so any peer can read them
//! without knowing the Rust types.

use serde::{Deserialize, Serialize};

/// Encodes `value` as MessagePack with struct fields as map keys.
pub(crate) fn to_vec<T: Serialize + ?Sized>(
    value: &T,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())?;
    Ok(out)
}

/// Decodes `T` from MessagePack, reporting the path of the first bad field.
pub(crate) fn from_slice<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, serde_path_to_error::Error<rmp_serde::decode::Error>> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // rmp-serde allows 1024 levels, deep enough to overflow a worker's stack through the
    // path-tracking wrapper; keep JSON's limit.
    de.set_max_depth(crate::wire::limits::MAX_DEPTH);
    serde_path_to_error::deserialize(&mut de)
}
