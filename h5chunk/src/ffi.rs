//! The few HDF5 1.10+ C functions this crate calls (`H5*public.h`).

#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_uint};

pub type hid_t = i64;
pub type herr_t = c_int;
pub type hsize_t = u64;

pub const H5F_ACC_RDONLY: c_uint = 0;
/// File close degrees (`H5F_close_degree_t`): WEAK, SEMI, STRONG. HDF5 refuses to open a file
/// that is already open with another degree; netCDF-C 4.9 uses WEAK, others may not.
pub const H5F_CLOSE_DEGREES: [c_int; 3] = [1, 2, 3];
pub const H5D_CHUNKED: c_int = 2;
pub const H5T_INTEGER: c_int = 0;
pub const H5T_FLOAT: c_int = 1;
pub const H5T_ORDER_LE: c_int = 0;
pub const H5T_SGN_NONE: c_int = 0;
pub const H5Z_FILTER_DEFLATE: c_int = 1;
pub const H5Z_FILTER_SHUFFLE: c_int = 2;
pub const H5P_DEFAULT: hid_t = 0;

unsafe extern "C" {
    pub static H5P_CLS_FILE_ACCESS_ID_g: hid_t;
    pub fn H5open() -> herr_t;
    pub fn H5Pcreate(cls_id: hid_t) -> hid_t;
    pub fn H5Pset_fclose_degree(fapl_id: hid_t, degree: c_int) -> herr_t;
    pub fn H5Pclose(plist_id: hid_t) -> herr_t;
    pub fn H5Fopen(filename: *const c_char, flags: c_uint, fapl_id: hid_t) -> hid_t;
    pub fn H5Fclose(file_id: hid_t) -> herr_t;
    pub fn H5Dopen2(loc_id: hid_t, name: *const c_char, dapl_id: hid_t) -> hid_t;
    pub fn H5Dclose(dset_id: hid_t) -> herr_t;
    pub fn H5Dget_space(dset_id: hid_t) -> hid_t;
    pub fn H5Dget_type(dset_id: hid_t) -> hid_t;
    pub fn H5Dget_create_plist(dset_id: hid_t) -> hid_t;
    pub fn H5Sget_simple_extent_ndims(space_id: hid_t) -> c_int;
    pub fn H5Sget_simple_extent_dims(
        space_id: hid_t,
        dims: *mut hsize_t,
        maxdims: *mut hsize_t,
    ) -> c_int;
    pub fn H5Sclose(space_id: hid_t) -> herr_t;
    pub fn H5Tget_class(type_id: hid_t) -> c_int;
    pub fn H5Tget_size(type_id: hid_t) -> usize;
    pub fn H5Tget_order(type_id: hid_t) -> c_int;
    pub fn H5Tget_sign(type_id: hid_t) -> c_int;
    pub fn H5Tclose(type_id: hid_t) -> herr_t;
    pub fn H5Pget_layout(plist_id: hid_t) -> c_int;
    pub fn H5Pget_chunk(plist_id: hid_t, max_ndims: c_int, dims: *mut hsize_t) -> c_int;
    pub fn H5Pget_nfilters(plist_id: hid_t) -> c_int;
    pub fn H5Pget_filter2(
        plist_id: hid_t,
        idx: c_uint,
        flags: *mut c_uint,
        cd_nelmts: *mut usize,
        cd_values: *mut c_uint,
        namelen: usize,
        name: *mut c_char,
        filter_config: *mut c_uint,
    ) -> c_int;
    /// Since 1.10.5. A chunk never written gets `size` 0 (and success).
    pub fn H5Dget_chunk_info_by_coord(
        dset_id: hid_t,
        offset: *const hsize_t,
        filter_mask: *mut c_uint,
        addr: *mut u64,
        size: *mut hsize_t,
    ) -> herr_t;
    pub fn H5Dread_chunk(
        dset_id: hid_t,
        dxpl_id: hid_t,
        offset: *const hsize_t,
        filters: *mut u32,
        buf: *mut std::ffi::c_void,
    ) -> herr_t;
}
