//! Validation data: numpy `.npz` archives (`np.savez` or `np.savez_compressed`).

use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::{ArrayD, Axis, IxDyn};
use ndarray_npy::{NpzReader, ReadNpzError, ReadableElement};

use super::onnx::{ElemType, ValueInfo};
use crate::error::{Error, Result};

/// An array read from an `.npz`, kept in (or converted to) the element type the model wants.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I16(ArrayD<i16>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

macro_rules! each_array {
    ($a:expr, $v:ident => $body:expr) => {
        match $a {
            Array::F32($v) => $body,
            Array::F64($v) => $body,
            Array::F16($v) => $body,
            Array::BF16($v) => $body,
            Array::I64($v) => $body,
            Array::I32($v) => $body,
            Array::I16($v) => $body,
            Array::I8($v) => $body,
            Array::U8($v) => $body,
            Array::Bool($v) => $body,
        }
    };
}

impl Array {
    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        each_array!(self, a => a.shape())
    }

    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        match self {
            Array::F64(_) | Array::I64(_) => 8,
            Array::F32(_) | Array::I32(_) => 4,
            Array::F16(_) | Array::BF16(_) | Array::I16(_) => 2,
            Array::I8(_) | Array::U8(_) | Array::Bool(_) => 1,
        }
    }

    /// numpy's name for the element type.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Array::F32(_) => "float32",
            Array::F64(_) => "float64",
            Array::F16(_) => "float16",
            Array::BF16(_) => "bfloat16",
            Array::I64(_) => "int64",
            Array::I32(_) => "int32",
            Array::I16(_) => "int16",
            Array::I8(_) => "int8",
            Array::U8(_) => "uint8",
            Array::Bool(_) => "bool",
        }
    }

    fn is_float(&self) -> bool {
        matches!(
            self,
            Array::F32(_) | Array::F64(_) | Array::F16(_) | Array::BF16(_)
        )
    }

    /// Values as `f64` (exact for every element type held here).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Array::F32(a) => a.mapv(f64::from),
            Array::F64(a) => a.clone(),
            Array::F16(a) => a.mapv(f16::to_f64),
            Array::BF16(a) => a.mapv(bf16::to_f64),
            Array::I64(a) => a.mapv(|v| v as f64),
            Array::I32(a) => a.mapv(f64::from),
            Array::I16(a) => a.mapv(f64::from),
            Array::I8(a) => a.mapv(f64::from),
            Array::U8(a) => a.mapv(f64::from),
            Array::Bool(a) => a.mapv(|v| f64::from(u8::from(v))),
        }
    }

    /// Integer values, or `None` for floating arrays.
    pub fn to_i64(&self) -> Option<ArrayD<i64>> {
        Some(match self {
            Array::I64(a) => a.clone(),
            Array::I32(a) => a.mapv(i64::from),
            Array::I16(a) => a.mapv(i64::from),
            Array::I8(a) => a.mapv(i64::from),
            Array::U8(a) => a.mapv(i64::from),
            Array::Bool(a) => a.mapv(|v| i64::from(u8::from(v))),
            _ => return None,
        })
    }

    /// Converts to the model input's element type. Integers may become floats; floats
    /// never become integers (that would silently truncate).
    pub fn convert_to(&self, elem: ElemType) -> Option<Array> {
        if self.is_float() && !elem.is_float() {
            return None;
        }
        Some(match elem {
            ElemType::F32 => match self {
                Array::F32(a) => Array::F32(a.clone()),
                other => Array::F32(other.to_f64().mapv(|v| v as f32)),
            },
            ElemType::F64 => Array::F64(self.to_f64()),
            ElemType::F16 => Array::F16(self.to_f64().mapv(crate::storage::dtype::f16_from_f64)),
            ElemType::BF16 => Array::BF16(self.to_f64().mapv(crate::storage::dtype::bf16_from_f64)),
            ElemType::I64 => Array::I64(self.to_i64()?),
            ElemType::I32 => Array::I32(narrow(self.to_i64()?)?),
            ElemType::U8 => Array::U8(narrow(self.to_i64()?)?),
            ElemType::Bool => Array::Bool(self.to_i64()?.mapv(|v| v != 0)),
            _ => return None,
        })
    }

    /// Rows `start..end` along axis 0 as a standard-layout array (copy of those rows),
    /// repeated-last-row padded to `pad_to` rows when given.
    pub fn rows(&self, start: usize, end: usize, pad_to: Option<usize>) -> Array {
        fn take<T: Clone>(
            a: &ArrayD<T>,
            start: usize,
            end: usize,
            pad: Option<usize>,
        ) -> ArrayD<T> {
            let mut idx: Vec<usize> = (start..end).collect();
            if let Some(p) = pad {
                while idx.len() < p {
                    idx.push(end - 1);
                }
            }
            a.select(Axis(0), &idx)
        }
        match self {
            Array::F32(a) => Array::F32(take(a, start, end, pad_to)),
            Array::F64(a) => Array::F64(take(a, start, end, pad_to)),
            Array::F16(a) => Array::F16(take(a, start, end, pad_to)),
            Array::BF16(a) => Array::BF16(take(a, start, end, pad_to)),
            Array::I64(a) => Array::I64(take(a, start, end, pad_to)),
            Array::I32(a) => Array::I32(take(a, start, end, pad_to)),
            Array::I16(a) => Array::I16(take(a, start, end, pad_to)),
            Array::I8(a) => Array::I8(take(a, start, end, pad_to)),
            Array::U8(a) => Array::U8(take(a, start, end, pad_to)),
            Array::Bool(a) => Array::Bool(take(a, start, end, pad_to)),
        }
    }
}

/// Integer values in a narrower type; `None` when one does not fit.
fn narrow<T: TryFrom<i64>>(a: ArrayD<i64>) -> Option<ArrayD<T>> {
    let shape = a.raw_dim();
    let v: Option<Vec<T>> = a.iter().map(|&x| T::try_from(x).ok()).collect();
    ArrayD::from_shape_vec(shape, v?).ok()
}

/// An open `.npz` archive.
pub struct Npz {
    path: PathBuf,
    reader: NpzReader<File>,
    names: Vec<String>,
}

impl Npz {
    /// Opens `path` and lists its arrays.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = NpzReader::new(file)
            .map_err(|e| Error::data(path, format!("not a numpy .npz archive ({e})")))?;
        let names = reader
            .names()
            .map_err(|e| Error::data(path, format!("not a numpy .npz archive ({e})")))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            names,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the arrays in the archive.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `true` if the archive holds an array called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Reads array `name`, whatever its element type.
    pub fn array(&mut self, name: &str) -> Result<Array> {
        if !self.has(name) {
            return Err(Error::data(
                &self.path,
                format!(
                    "no array `{name}` (it has: {})",
                    self.names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        check_declared_size(&self.path, name)?;
        macro_rules! attempt {
            ($t:ty, $variant:ident) => {
                match self.read::<$t>(name)? {
                    Some(a) => return Ok(Array::$variant(row_major(a))),
                    None => {}
                }
            };
        }
        attempt!(f32, F32);
        attempt!(f64, F64);
        attempt!(i64, I64);
        attempt!(i32, I32);
        attempt!(u8, U8);
        attempt!(i16, I16);
        attempt!(i8, I8);
        attempt!(bool, Bool);
        if let Some(a) = read_other(&self.path, name)? {
            return Ok(a);
        }
        Err(Error::data(
            &self.path,
            format!(
                "array `{name}` has an element type that is not supported \
                 (use float16/32/64 or an integer type)"
            ),
        ))
    }

    fn read<T: ReadableElement + Clone>(&mut self, name: &str) -> Result<Option<ArrayD<T>>> {
        match self.reader.by_name::<ndarray::OwnedRepr<T>, IxDyn>(name) {
            Ok(a) => Ok(Some(a)),
            Err(ReadNpzError::Npy(ndarray_npy::ReadNpyError::WrongDescriptor(_))) => Ok(None),
            Err(e) => Err(Error::data(&self.path, format!("array `{name}`: {e}"))),
        }
    }
}

/// Refuses an array whose `.npy` header declares more data than its archive entry can
/// hold: the npy reader allocates the declared size before reading, so a damaged or
/// hostile file of a few bytes could otherwise exhaust memory. Headers this check cannot
/// parse are left to the reader, which validates them.
fn check_declared_size(path: &Path, name: &str) -> Result<()> {
    with_entry(path, name, |entry| check_entry_size(path, name, entry)).map(|_| ())
}

/// Calls `f` with the archive entry of array `name` (`name` or `name.npy`) of the `.npz`
/// at `path`; `None` when there is no such entry.
fn with_entry<R>(
    path: &Path,
    name: &str,
    f: impl FnOnce(&mut zip::read::ZipFile<'_, File>) -> Result<R>,
) -> Result<Option<R>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::data(path, format!("array `{name}`: not a valid archive ({e})")))?;
    let npy_name = format!("{name}.npy");
    let entry_name = if zip.index_for_name(name).is_some() {
        name
    } else {
        &npy_name
    };
    let Ok(mut entry) = zip.by_name(entry_name) else {
        return Ok(None);
    };
    f(&mut entry).map(Some)
}

/// [`check_declared_size`] for one entry.
fn check_entry_size(
    path: &Path,
    name: &str,
    entry: &mut zip::read::ZipFile<'_, File>,
) -> Result<()> {
    use std::io::Read;
    let bad = |m: String| Error::data(path, format!("array `{name}`: {m}"));
    let (size, compressed) = (entry.size(), entry.compressed_size());
    let mut head = Vec::new();
    entry
        .take(1 << 16)
        .read_to_end(&mut head)
        .map_err(|e| bad(format!("cannot read it ({e})")))?;
    let Some((header_end, declared)) = npy_declared_bytes(&head) else {
        return Ok(());
    };
    // Deflate cannot expand data more than about 1032 times.
    let holds = size.min(compressed.saturating_mul(1032).saturating_add(1 << 16));
    let available = holds.saturating_sub(header_end as u64);
    if declared > available {
        return Err(bad(format!(
            "its header declares {declared} bytes of data but the file holds at most {available}: \
             the file is damaged or truncated"
        )));
    }
    Ok(())
}

/// `a` in row-major (C) order: arrays saved in Fortran order (`np.asfortranarray`, or a
/// transposed view passed to `np.savez`) are read in that layout, and batches of rows
/// must be contiguous to be fed to ONNX Runtime.
fn row_major<T: Clone>(a: ArrayD<T>) -> ArrayD<T> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// The header of a `.npy` file.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    /// The numpy type string, e.g. `<f2`.
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Where the data start.
    data_start: usize,
}

/// Parses the header at the start of a `.npy` file; `None` when it is not in a form we parse.
fn npy_header(head: &[u8]) -> Option<NpyHeader> {
    if head.get(..6)? != b"\x93NUMPY" {
        return None;
    }
    let (len, start): (usize, usize) = match head.get(6)? {
        1 => (
            u16::from_le_bytes([*head.get(8)?, *head.get(9)?]) as usize,
            10,
        ),
        _ => (
            u32::from_le_bytes(head.get(8..12)?.try_into().ok()?) as usize,
            12,
        ),
    };
    let end = start.checked_add(len)?;
    let header = std::str::from_utf8(head.get(start..end)?).ok()?;
    let descr = header.split("'descr':").nth(1)?.split('\'').nth(1)?;
    let fortran_order = header
        .split("'fortran_order':")
        .nth(1)?
        .trim_start()
        .starts_with("True");
    let shape = header.split("'shape':").nth(1)?;
    let shape = shape.split('(').nth(1)?.split(')').next()?;
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some(NpyHeader {
        descr: descr.to_string(),
        fortran_order,
        shape,
        data_start: end,
    })
}

/// From the start of a `.npy` file: where the header ends and the bytes of data it
/// declares (shape × item size); `None` when the header is not in a form we parse.
fn npy_declared_bytes(head: &[u8]) -> Option<(usize, u64)> {
    let h = npy_header(head)?;
    let item: u64 = h
        .descr
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    let mut count: u64 = 1;
    for &dim in &h.shape {
        count = count.checked_mul(dim as u64)?;
    }
    Some((h.data_start, count.saturating_mul(item)))
}

/// Reads array `name` of the `.npz` at `path` when it has a type the npy reader does not
/// know: float16 (`<f2`, as half-precision pipelines save their inputs) and unsigned
/// 16/32/64-bit integers (widened to int32/int64). `None` for other types. The declared
/// size was checked against the archive entry before ([`check_declared_size`]).
fn read_other(path: &Path, name: &str) -> Result<Option<Array>> {
    use std::io::Read;
    let bad = |m: String| Error::data(path, format!("array `{name}`: {m}"));
    let read = with_entry(path, name, |entry| {
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read it ({e})")))?;
        Ok(bytes)
    })?;
    let Some(bytes) = read else {
        return Ok(None);
    };
    let Some(h) = npy_header(&bytes) else {
        return Ok(None);
    };
    let size = match h.descr.as_str() {
        "<f2" | "<u2" => 2,
        "<u4" => 4,
        "<u8" => 8,
        _ => return Ok(None),
    };
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad("its shape overflows".into()))?;
    let data = bytes
        .get(h.data_start..)
        .filter(|d| count.checked_mul(size).is_some_and(|n| d.len() >= n))
        .ok_or_else(|| bad("it holds less data than its header declares".into()))?;
    // The values in the header's order, as a row-major array.
    fn shaped<T: Clone>(h: &NpyHeader, values: Vec<T>) -> std::result::Result<ArrayD<T>, String> {
        use ndarray::ShapeBuilder;
        let dims = IxDyn(&h.shape);
        let shape = if h.fortran_order {
            dims.f()
        } else {
            dims.into_shape_with_order()
        };
        ArrayD::from_shape_vec(shape, values)
            .map(row_major)
            .map_err(|e| e.to_string())
    }
    let values = data[..count * size].chunks_exact(size);
    Ok(Some(match h.descr.as_str() {
        "<f2" => Array::F16(
            shaped(
                &h,
                values.map(|c| f16::from_le_bytes([c[0], c[1]])).collect(),
            )
            .map_err(bad)?,
        ),
        "<u2" => Array::I32(
            shaped(
                &h,
                values
                    .map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        "<u4" => Array::I64(
            shaped(
                &h,
                values
                    .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        _ => Array::I64(
            shaped(
                &h,
                values
                    .map(|c| {
                        let x =
                            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                        i64::try_from(x)
                            .map_err(|_| bad(format!("the uint64 value {x} does not fit an int64")))
                    })
                    .collect::<Result<Vec<i64>>>()?,
            )
            .map_err(bad)?,
        ),
    }))
}

/// Labels for the metric: class indices, or target values.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// One class (or entity) index per row.
    Classes(Vec<i64>),
    /// `per_row` target values per row, row-major.
    Values { values: Vec<f64>, per_row: usize },
}

impl Labels {
    /// Builds labels from an array: integer arrays of shape `[n]` or `[n, 1]` are class
    /// indices, floating arrays are targets.
    pub fn from_array(path: &Path, name: &str, a: &Array) -> Result<Self> {
        let shape = a.shape();
        let rows = shape.first().copied().unwrap_or(0);
        if shape.is_empty() {
            return Err(Error::data(
                path,
                format!("labels `{name}` are a scalar; expected one row per sample"),
            ));
        }
        match a.to_i64() {
            Some(ints) if shape.len() == 1 || (shape.len() == 2 && shape[1] == 1) => {
                Ok(Labels::Classes(ints.iter().copied().collect()))
            }
            Some(_) => Err(Error::data(
                path,
                format!(
                    "integer labels `{name}` have shape {shape:?}; expected [rows] or [rows, 1]"
                ),
            )),
            None => {
                let v = a.to_f64();
                let per_row = v.len().checked_div(rows).unwrap_or(0);
                Ok(Labels::Values {
                    values: v.iter().copied().collect(),
                    per_row,
                })
            }
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            Labels::Classes(c) => c.len(),
            Labels::Values { values, per_row } => values.len().checked_div(*per_row).unwrap_or(0),
        }
    }
}

/// Filtered-ranking side information: for each validation row, the other true candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub indptr: Vec<usize>,
    pub indices: Vec<i64>,
}

impl Filter {
    /// Reads CSR arrays `indptr` (rows + 1) and `indices` from `path`.
    pub fn load(path: &Path, rows: usize) -> Result<Self> {
        let mut npz = Npz::open(path)?;
        let indptr_a = npz.array("indptr")?;
        let indices_a = npz.array("indices")?;
        let bad = |m: String| Error::data(path, m);
        let indptr: Vec<i64> = indptr_a
            .to_i64()
            .ok_or_else(|| bad("`indptr` must be an integer array".into()))?
            .iter()
            .copied()
            .collect();
        let indices: Vec<i64> = indices_a
            .to_i64()
            .ok_or_else(|| bad("`indices` must be an integer array".into()))?
            .iter()
            .copied()
            .collect();
        if indptr.len() != rows + 1 {
            return Err(bad(format!(
                "`indptr` has {} entries; expected rows + 1 = {}",
                indptr.len(),
                rows + 1
            )));
        }
        if indptr[0] != 0
            || indptr.windows(2).any(|w| w[1] < w[0])
            || indptr[rows] as usize != indices.len()
        {
            return Err(bad(
                "`indptr` must start at 0, never decrease, and end at len(indices)".into(),
            ));
        }
        // Each row's candidates sorted and de-duplicated: a candidate listed twice must
        // be left out once, not twice.
        let mut rows_out = Vec::with_capacity(indices.len());
        let mut ptr = vec![0usize];
        for w in indptr.windows(2) {
            let mut row = indices[w[0] as usize..w[1] as usize].to_vec();
            row.sort_unstable();
            row.dedup();
            rows_out.extend(row);
            ptr.push(rows_out.len());
        }
        Ok(Self {
            indptr: ptr,
            indices: rows_out,
        })
    }

    /// The other true candidates of `row`.
    pub fn row(&self, row: usize) -> &[i64] {
        &self.indices[self.indptr[row]..self.indptr[row + 1]]
    }
}

/// Validation data bound to the model's inputs.
#[derive(Debug, Clone)]
pub struct ValidationSet {
    /// (model input name, array converted to its element type).
    pub inputs: Vec<(String, Array)>,
    pub labels: Option<Labels>,
    pub rows: usize,
    pub path: PathBuf,
}

/// How arrays are chosen for the model's inputs and the labels.
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// `--input NAME=ARRAY` pairs.
    pub input_map: Vec<(String, String)>,
    /// `--labels` (default `y`).
    pub labels: Option<String>,
}

/// Reads the validation set at `path` for a model with `model_inputs`.
pub fn load_validation(
    path: &Path,
    model_inputs: &[ValueInfo],
    options: &DataOptions,
    labels_required: bool,
) -> Result<ValidationSet> {
    let mut npz = Npz::open(path)?;
    let mut inputs = Vec::new();
    for (name, _) in &options.input_map {
        if !model_inputs.iter().any(|i| &i.name == name) {
            return Err(Error::Usage(format!(
                "--input {name}=...: the model has no input `{name}` (its inputs: {})",
                model_inputs
                    .iter()
                    .map(|i| format!("`{}`", i.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    for input in model_inputs {
        let mapped = options
            .input_map
            .iter()
            .find(|(n, _)| n == &input.name)
            .map(|(_, a)| a.clone());
        let array_name = match mapped {
            Some(a) => a,
            None if npz.has(&input.name) => input.name.clone(),
            None if model_inputs.len() == 1 && npz.has("x") => "x".to_string(),
            None => {
                return Err(Error::data(
                    path,
                    format!(
                        "no array for model input `{}`: name an array `{}`{} or map one with --input {}=ARRAY (arrays: {})",
                        input.name,
                        input.name,
                        if model_inputs.len() == 1 { " or `x`" } else { "" },
                        input.name,
                        npz.names().iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        };
        let raw = npz.array(&array_name)?;
        let elem = input.elem.ok_or_else(|| {
            Error::model(
                PathBuf::new(),
                format!("input `{}` has an unsupported element type", input.name),
            )
        })?;
        let arr = raw.convert_to(elem).ok_or_else(|| {
            Error::data(
                path,
                format!(
                    "array `{array_name}` is {} but model input `{}` takes {:?} \
                     (floats are never truncated to integers; integers must fit the input's type)",
                    raw.dtype_name(),
                    input.name,
                    elem
                ),
            )
        })?;
        check_shape(path, &array_name, arr.shape(), input)?;
        inputs.push((input.name.clone(), arr));
    }
    let rows = inputs
        .first()
        .map(|(_, a)| a.shape()[0])
        .ok_or_else(|| Error::data(path, "the model has no data inputs"))?;
    for (name, a) in &inputs {
        if a.shape()[0] != rows {
            return Err(Error::data(
                path,
                format!(
                    "the arrays for the model's inputs have different numbers of rows ({} for `{name}`, {rows} for `{}`)",
                    a.shape()[0],
                    inputs[0].0
                ),
            ));
        }
    }
    if rows == 0 {
        return Err(Error::data(path, "the validation set has zero rows"));
    }
    let label_name = options.labels.clone().unwrap_or_else(|| "y".to_string());
    let labels = if npz.has(&label_name) {
        let a = npz.array(&label_name)?;
        let l = Labels::from_array(path, &label_name, &a)?;
        if l.rows() != rows {
            return Err(Error::data(
                path,
                format!(
                    "labels `{label_name}` have {} rows but the inputs have {rows}",
                    l.rows()
                ),
            ));
        }
        Some(l)
    } else if labels_required || options.labels.is_some() {
        return Err(Error::data(
            path,
            format!(
                "no labels array `{label_name}` (arrays: {}); name the labels with --labels",
                npz.names()
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    } else {
        None
    };
    Ok(ValidationSet {
        inputs,
        labels,
        rows,
        path: path.to_path_buf(),
    })
}

fn check_shape(path: &Path, array: &str, shape: &[usize], input: &ValueInfo) -> Result<()> {
    if shape.is_empty() {
        return Err(Error::data(
            path,
            format!("array `{array}` is a scalar; expected rows along axis 0"),
        ));
    }
    let Some(expected) = &input.shape else {
        return Ok(());
    };
    let fmt = |s: &[Option<i64>]| {
        let parts: Vec<String> = s
            .iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect();
        format!("[{}]", parts.join(", "))
    };
    let ok = shape.len() == expected.len()
        && shape
            .iter()
            .zip(expected)
            .skip(1)
            .all(|(&a, e)| e.is_none_or(|e| e as usize == a));
    if ok && !shape.is_empty() {
        return Ok(());
    }
    Err(Error::data(
        path,
        format!(
            "array `{array}` has shape {shape:?} but model input `{}` expects {} (rows along axis 0)",
            input.name,
            fmt(expected)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;
    use ndarray_npy::NpzWriter;

    #[test]
    fn filter_rows_are_deduplicated_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.npz");
        let mut w = NpzWriter::new(File::create(&p).unwrap());
        w.add_array("indptr", &arr1(&[0i64, 3, 3, 5])).unwrap();
        w.add_array("indices", &arr1(&[4i64, 1, 4, 2, 2])).unwrap();
        w.finish().unwrap();
        let f = Filter::load(&p, 3).unwrap();
        assert_eq!(f.row(0), &[1, 4]);
        assert_eq!(f.row(1), &[] as &[i64]);
        assert_eq!(f.row(2), &[2]);
        let err = Filter::load(&p, 4).unwrap_err().to_string();
        assert!(
            err.contains("`indptr` has 4 entries; expected rows + 1 = 5"),
            "{err}"
        );
    }
}
