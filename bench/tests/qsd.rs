//! The client against qemu-storage-daemon, the reference backend.

mod common;
#[path = "common/suite.rs"]
mod suite;

macro_rules! against {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let Some(b) = common::backend("qsd") else { return };
            suite::$name(b);
        }
    )*};
}

against!(
    config_reports_capacity_and_queues,
    reads_return_image_data,
    write_read_back_flush_and_file_content,
    many_requests_in_flight,
    get_id_discard_write_zeroes,
    unknown_type_is_unsupported,
    reads_past_the_end_fail,
    second_client_after_disconnect,
    works_without_event_idx_and_reply_ack,
    verified_random_io_on_two_queues,
);
