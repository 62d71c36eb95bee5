//! Serving a virtqueue: the one loop every device's queue goes through (pop
//! a chain, parse it, hand it to the device, return it), with a per-call
//! budget so a guest that keeps its avail index ahead cannot hold the event
//! thread, and the one interrupt policy (event index when negotiated,
//! otherwise the avail ring's NO_INTERRUPT flag).

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{Chain, Layout, Limits};
use super::Interrupt;

/// What the device did with one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Return it to the driver with this many bytes written into it.
    Used(u32),
    /// Put it back in the ring and end this turn (nothing to fill it with,
    /// or no room for its contents now).
    Later,
    /// Put it back and offer it again (the device moved on to other work
    /// that may use it). Counts against the budget like any chain.
    Again,
}

/// Why a turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The ring had nothing more (or its avail index is garbage).
    Empty,
    /// The device said `Served::Later`.
    Later,
    /// The budget ran out with chains possibly left: the caller comes back
    /// on a later turn (it re-kicks its queue).
    Budget,
}

/// The outcome of one `serve_queue` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turn {
    /// Chains returned to the driver.
    pub used: usize,
    pub stop: Stop,
}

/// Serves `queue`: pops each available chain, parses it (`layout`,
/// `limits`), hands it to `serve`, and returns, puts back or keeps going as
/// `serve` says, until the ring is empty, `serve` says `Later`, or `budget`
/// chains were popped; then interrupts the driver if it wants to be told.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    budget: usize,
    (layout, limits): (Layout, Limits),
    mut serve: F,
) -> Turn
where
    F: FnMut(&GuestMemoryMmap, &Chain) -> Served,
{
    let mut chain = Chain::default();
    let mut popped = 0;
    let mut used = 0;
    let stop = 'turn: loop {
        if queue.disable_notification(mem).is_err() {
            break Stop::Empty;
        }
        let before = popped;
        while let Some(descriptors) = pop_chain(queue, mem) {
            popped += 1;
            chain.parse(mem, descriptors, layout, limits);
            match serve(mem, &chain) {
                Served::Used(len) => {
                    return_chain(queue, mem, chain.head(), len);
                    used += 1;
                }
                Served::Again => queue.go_to_previous_position(),
                Served::Later => {
                    queue.go_to_previous_position();
                    // Kicks are wanted again once the device can go on.
                    let _ = queue.enable_notification(mem);
                    break 'turn Stop::Later;
                }
            }
            if popped >= budget {
                break 'turn Stop::Budget;
            }
        }
        match queue.enable_notification(mem) {
            // More arrived while notifications were off. An avail index
            // that yields nothing (garbage) ends the turn instead of spinning.
            Ok(true) if popped > before => continue,
            _ => break Stop::Empty,
        }
    };
    if used > 0 && needs_interrupt(queue, mem) {
        interrupt.signal_used_queue();
    }
    Turn { used, stop }
}

/// The next available chain, if any. As virtio-queue's
/// `pop_descriptor_chain`, without its error-level log line for a garbage
/// avail index: the guest chooses that index, and one line per notify would
/// let it flood the host's log.
pub fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
    queue.iter(mem).ok()?.next()
}

/// Puts chain `head` in the used ring with `len` bytes written. A head
/// index past the ring (the guest's avail ring named it) cannot be
/// returned: checked here, because virtio-queue's `add_used` logs it at
/// error level, once per chain the guest makes up.
pub fn return_chain(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if head >= queue.size() || queue.add_used(mem, head, len).is_err() {
        log::debug!("virtio: cannot return chain {head}");
    }
}

/// Whether the driver wants an interrupt for the used buffers added since
/// the last call: the event index when negotiated, otherwise the avail
/// ring's NO_INTERRUPT flag (which virtio-queue's `needs_notification`
/// ignores).
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used ring writes before the flag read, as needs_notification does.
    fence(Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use crate::virtio::test_queue::{DriverQueue, RING_SIZE};
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;

    const MEM_SIZE: usize = 1 << 20;
    const RING: u64 = 0x1_0000;
    const BUF: u64 = 0x8_0000;
    const ANY: (Layout, Limits) = (Layout::ReadThenWrite, Limits::descriptors(16));

    fn setup() -> (
        &'static GuestMemoryMmap,
        DriverQueue,
        Queue,
        Interrupt,
        EventFd,
    ) {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let driver = DriverQueue::new(mem, RING);
        let queue = driver.queue();
        let line = IrqLine::new().unwrap();
        let irq = line.eventfd().try_clone().unwrap();
        (mem, driver, queue, Interrupt::new(line), irq)
    }

    #[test]
    fn a_guest_racing_ahead_cannot_keep_one_turn_going() {
        // While the device serves each chain, the "guest" publishes another
        // (as a vCPU could, between the device's reads of the avail index).
        // It gives up after ten budgets' worth, so a loop without a budget
        // ends the test with a failed count instead of hanging it.
        const BUDGET: usize = 32;
        let (mem, mut driver, mut queue, interrupt, irq) = setup();
        let head = driver.add(&[(BUF, 64, 0)]);
        let mut calls = 0;
        let turn = serve_queue(&mut queue, mem, &interrupt, BUDGET, ANY, |_, chain| {
            assert_eq!(chain.head(), head);
            calls += 1;
            if calls < 10 * BUDGET {
                driver.publish(head);
            }
            Served::Used(0)
        });
        assert_eq!(calls, BUDGET);
        assert_eq!(
            turn,
            Turn {
                used: BUDGET,
                stop: Stop::Budget
            }
        );
        assert_eq!(driver.used().len(), BUDGET);
        assert_eq!(irq.read().unwrap(), 1, "one interrupt for the turn");
    }

    #[test]
    fn put_back_chains_count_against_the_budget() {
        // A device that keeps offering the chain back (Again) still ends.
        let (mem, mut driver, mut queue, interrupt, irq) = setup();
        driver.add(&[(BUF, 64, 0)]);
        let mut calls = 0;
        let turn = serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| {
            calls += 1;
            Served::Again
        });
        assert_eq!(
            (calls, turn),
            (
                8,
                Turn {
                    used: 0,
                    stop: Stop::Budget
                }
            )
        );
        assert!(irq.read().is_err(), "nothing used, no interrupt");
        // Later leaves the chain in the ring for the next turn.
        let turn = serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Later);
        assert_eq!(
            turn,
            Turn {
                used: 0,
                stop: Stop::Later
            }
        );
        let turn = serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Used(3));
        assert_eq!(
            turn,
            Turn {
                used: 1,
                stop: Stop::Empty
            }
        );
        assert_eq!(driver.used(), vec![(0, 3)]);
    }

    #[test]
    fn a_garbage_avail_index_ends_the_turn() {
        let (mem, driver, mut queue, interrupt, _irq) = setup();
        driver.set_avail_idx(RING_SIZE + 1);
        let turn = serve_queue(&mut queue, mem, &interrupt, 1000, ANY, |_, _| {
            panic!("no chain can be served")
        });
        assert_eq!(
            turn,
            Turn {
                used: 0,
                stop: Stop::Empty
            }
        );
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let (mem, mut driver, mut queue, interrupt, irq) = setup();
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        driver.add(&[(BUF, 64, 0)]);
        serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Used(0));
        assert!(irq.read().is_err(), "the driver asked for no interrupt");
        driver.set_avail_flags(0);
        driver.add(&[(BUF, 64, 0)]);
        serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Used(0));
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(driver.used().len(), 2);
    }

    #[test]
    fn event_idx_interrupts_only_past_used_event() {
        let (mem, mut driver, mut queue, interrupt, irq) = setup();
        queue.set_event_idx(true);
        // The driver wants an interrupt once used entry 2 is published.
        driver.set_used_event(2);
        // NO_INTERRUPT means nothing once the event index is negotiated.
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        driver.add(&[(BUF, 64, 0)]);
        serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Used(0));
        assert!(irq.read().is_err(), "used index 1 has not passed 2");
        driver.add(&[(BUF, 64, 0)]);
        driver.add(&[(BUF, 64, 0)]);
        serve_queue(&mut queue, mem, &interrupt, 8, ANY, |_, _| Served::Used(0));
        assert_eq!(irq.read().unwrap(), 1, "used index 3 passed 2");
    }
}
