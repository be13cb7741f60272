//! The mirror's filter: classic BPF as libpcap compiles a tcpdump expression, run by the tap
//! programs in the kernel before the clone, and by the host in unit tests against libpcap's
//! own verdicts. One implementation for both, so what the tests prove is what the kernel runs.
//!
//! Why an interpreter over a map rather than code generated per filter: a session's filter is
//! replaced by writing a map (no program reload, no gap: `vmsniff update`), one program serves
//! the eight sessions of a tap, and it verifies on every kernel from 5.10 on. Userspace
//! validates each program ([`validate`]) before it reaches the map; the interpreter still
//! treats anything unexpected as "no match" rather than trusting that.

/// Instructions a filter may have. libpcap's optimiser brings common filters to 5–60
/// instructions; the bound keeps the verifier's work (a bounded loop per session) small.
pub const MAX_FILTER_INSNS: usize = 128;
const _: () = assert!(MAX_FILTER_INSNS.is_power_of_two());

/// A classic BPF instruction, `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Longest filter expression kept (NUL-padded) beside its program, for `status`.
pub const FILTER_EXPRESSION_BYTES: usize = 256;

/// Value of the `FILTERS` array: one session's program, and the expression it came from. Two slots per session
/// ([`filter_index`]): userspace fills the idle one, then points the session at it, so the
/// program never reads a half-written filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Instructions in use; 0 = the slot is empty.
    pub len: u32,
    pub _pad: u32,
    pub insns: [FilterInsn; MAX_FILTER_INSNS],
    /// The tcpdump expression, as the operator typed it, NUL-padded.
    pub expression: [u8; FILTER_EXPRESSION_BYTES],
}

impl Filter {
    pub const EMPTY: Filter = Filter {
        len: 0,
        _pad: 0,
        insns: [FilterInsn { code: 0, jt: 0, jf: 0, k: 0 }; MAX_FILTER_INSNS],
        expression: [0; FILTER_EXPRESSION_BYTES],
    };
}

/// Index of a session's filter slot (`slot` 0 or 1) in the `FILTERS` array.
pub const fn filter_index(session_id: u32, slot: u32) -> u32 {
    session_id * 2 + (slot & 1)
}

/// Classic BPF's scratch memory, `M[0..16]`.
pub const SCRATCH_WORDS: usize = 16;

/// Bytes of [`Machine::head`] that hold the frame as on the wire: a load that ends within them
/// reads `head`, any other starts at byte 16 or later of the view (loads are at most 4 bytes).
pub const HEAD_BYTES: u32 = 20;

/// The interpreter's machine state: registers, scratch memory and load buffers.
///
/// In the kernel it lives in a per-CPU map value rather than in BPF registers, and every access
/// is volatile: the verifier does not track values read back from a map, so every path through
/// an instruction reaches the next one in the same (unknown) state and is verified once, instead
/// of once per combination of register values. That keeps a 128-step loop per session within
/// the verifier's budget on 5.10.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// 64-bit, so that the bound check and the index are one register (a 32-bit value is
    /// zero-extended into copies whose bounds the verifier does not link).
    pub pc: u64,
    pub a: u32,
    pub x: u32,
    pub mem: [u32; SCRATCH_WORDS],
    /// The first [`HEAD_BYTES`] of a frame whose VLAN tag the kernel keeps out of the data,
    /// with the tag put back (the frame's [`Frame::load`] fills and reads it). Sized so that
    /// any 4 bytes at an offset masked to 5 bits are inside it.
    pub head: [u8; 40],
    /// Where a load from the frame lands.
    pub buf: [u8; 8],
}

impl Default for Machine {
    fn default() -> Self {
        Machine { pc: 0, a: 0, x: 0, mem: [0; SCRATCH_WORDS], head: [0; 40], buf: [0; 8] }
    }
}

/// Reads a field of the machine through memory (see [`Machine`] for why).
#[inline(always)]
pub fn get<T: Copy>(field: &T) -> T {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(field) }
}

/// Writes a field of the machine through memory (see [`Machine`] for why).
#[inline(always)]
pub fn set<T>(field: &mut T, value: T) {
    // SAFETY: a valid exclusive reference.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// The first `size` (1, 2 or 4) of four big-endian bytes, as classic BPF loads them.
#[inline(always)]
pub fn big_endian(bytes: [u8; 4], size: u32) -> u32 {
    u32::from_be_bytes(bytes).wrapping_shr(32u32.wrapping_sub(size.wrapping_mul(8)))
}

/// The frame as a filter sees it: as it is on the wire, a VLAN tag included even where the
/// kernel has moved it out of the data into the skb's metadata.
pub trait Frame {
    /// Length of the frame on the wire.
    fn wire_len(&self) -> u32;
    /// Whether loads read the data as it is, with no VLAN tag put back in front of it.
    fn untagged(&self) -> bool;
    /// `size` (1, 2 or 4) bytes at `offset`, big-endian, or `None` past the end. May use the
    /// machine's `head` and `buf`.
    fn load(&self, m: &mut Machine, offset: u32, size: u32) -> Option<u32>;
}

// Instruction classes, sizes, modes and operations of `linux/bpf_common.h`.
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const STX: u16 = 0x03;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const MSH: u16 = 0xa0;
const K: u16 = 0x00;
const X: u16 = 0x08;
const RET_A: u16 = 0x10;
const ADD: u16 = 0x00;
const SUB: u16 = 0x10;
const MUL: u16 = 0x20;
const DIV: u16 = 0x30;
const OR: u16 = 0x40;
const AND: u16 = 0x50;
const LSH: u16 = 0x60;
const RSH: u16 = 0x70;
const NEG: u16 = 0x80;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;
const LD_H_ABS: u16 = LD | H | ABS;
const LD_B_ABS: u16 = LD | B | ABS;
const JEQ_K: u16 = JMP | JEQ | K;
const RET_K: u16 = RET | K;

/// Runs `filter` on `frame`: true when it accepts (returns non-zero), as tcpdump would capture
/// the frame. A load past the end of the frame, a division by zero or an unknown instruction
/// rejects, as in libpcap's and the kernel's classic BPF.
///
/// Shaped for the verifier: one load path for every load instruction, machine state only in
/// memory, and each instruction class a short branch back to the loop's head.
#[inline(always)]
pub fn matches<F: Frame>(filter: &Filter, frame: &F, m: &mut Machine) -> bool {
    set(&mut m.a, 0);
    set(&mut m.x, 0);
    set(&mut m.pc, 0);
    let len = u64::from(filter.len);
    // Jumps only go forward, so a valid program ends within this many steps.
    for _ in 0..MAX_FILTER_INSNS {
        let pc = get(&m.pc);
        if pc >= len {
            return false;
        }
        // A mask rather than a second comparison bounds the index for the verifier (`len` is
        // at most MAX_FILTER_INSNS in any filter userspace writes; past that, the mask only
        // wraps a corrupt one, which still ends within the loop's bound).
        let insn = &filter.insns[pc as usize & (MAX_FILTER_INSNS - 1)];
        let (code, k) = (insn.code, insn.k);
        // The instructions libpcap's programs are mostly made of, decoded whole: each a few
        // instructions here, where decoding class, mode and size below takes dozens.
        match code {
            // Only where the data is the frame as on the wire: the tagged view's own bounds
            // checks need a size the compiler does not know.
            LD_H_ABS if frame.untagged() => {
                let Some(value) = frame.load(m, k, 2) else {
                    return false;
                };
                set(&mut m.a, value);
                set(&mut m.pc, pc + 1);
                continue;
            }
            LD_B_ABS if frame.untagged() => {
                let Some(value) = frame.load(m, k, 1) else {
                    return false;
                };
                set(&mut m.a, value);
                set(&mut m.pc, pc + 1);
                continue;
            }
            JEQ_K => {
                let skip = if get(&m.a) == k { insn.jt } else { insn.jf };
                set(&mut m.pc, pc + 1 + u64::from(skip));
                continue;
            }
            RET_K => return k != 0,
            _ => {}
        }
        set(&mut m.pc, pc + 1);
        match code & 0x07 {
            LD | LDX => {
                let mode = code & 0xe0;
                let value = match mode {
                    IMM => k,
                    MEM => get(&m.mem[k as usize % SCRATCH_WORDS]),
                    LEN => frame.wire_len(),
                    _ => {
                        let offset = if mode == IND { get(&m.x).wrapping_add(k) } else { k };
                        let size = match code & 0x18 {
                            W => 4,
                            H => 2,
                            _ => 1,
                        };
                        let Some(value) = frame.load(m, offset, size) else {
                            return false;
                        };
                        if mode == MSH { (value & 0x0f) << 2 } else { value }
                    }
                };
                if code & 0x07 == LD {
                    set(&mut m.a, value);
                } else {
                    set(&mut m.x, value);
                }
            }
            ST => set(&mut m.mem[k as usize % SCRATCH_WORDS], get(&m.a)),
            STX => set(&mut m.mem[k as usize % SCRATCH_WORDS], get(&m.x)),
            ALU => {
                let operand = if code & X != 0 { get(&m.x) } else { k };
                let a = get(&m.a);
                let result = match code & 0xf0 {
                    ADD => a.wrapping_add(operand),
                    SUB => a.wrapping_sub(operand),
                    MUL => a.wrapping_mul(operand),
                    DIV if operand != 0 => a / operand,
                    MOD if operand != 0 => a % operand,
                    OR => a | operand,
                    AND => a & operand,
                    LSH => a.wrapping_shl(operand),
                    RSH => a.wrapping_shr(operand),
                    NEG => a.wrapping_neg(),
                    XOR => a ^ operand,
                    _ => return false,
                };
                set(&mut m.a, result);
            }
            JMP => {
                let skip = if code & 0xf0 == JA {
                    k
                } else {
                    let operand = if code & X != 0 { get(&m.x) } else { k };
                    let a = get(&m.a);
                    let taken = match code & 0xf0 {
                        JEQ => a == operand,
                        JGT => a > operand,
                        JGE => a >= operand,
                        JSET => a & operand != 0,
                        _ => return false,
                    };
                    u32::from(if taken { insn.jt } else { insn.jf })
                };
                set(&mut m.pc, pc + 1 + u64::from(skip));
            }
            RET => return (if code & RET_A != 0 { get(&m.a) } else { k }) != 0,
            _ => {
                if code & 0xf8 == TXA {
                    set(&mut m.a, get(&m.x));
                } else {
                    set(&mut m.x, get(&m.a));
                }
            }
        }
    }
    false
}

/// Why a classic BPF program cannot run as a mirror filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidFilter {
    Empty,
    TooLong {
        len: usize,
    },
    UnknownInstruction {
        at: usize,
        code: u16,
    },
    /// Linux's ancillary loads (`SKF_AD_*`, negative offsets) read socket metadata a tap
    /// program does not have.
    AncillaryLoad {
        at: usize,
    },
    JumpOutOfRange {
        at: usize,
    },
    ScratchOutOfRange {
        at: usize,
    },
    DivisionByZero {
        at: usize,
    },
    NoReturnAtEnd,
}

/// Checks a program the way the kernel checks classic BPF before running it: known
/// instructions, jumps inside the program, scratch indexes in range, a return at the end.
pub fn validate(insns: &[FilterInsn]) -> Result<(), InvalidFilter> {
    if insns.is_empty() {
        return Err(InvalidFilter::Empty);
    }
    if insns.len() > MAX_FILTER_INSNS {
        return Err(InvalidFilter::TooLong { len: insns.len() });
    }
    for (at, insn) in insns.iter().enumerate() {
        let (code, k) = (insn.code, insn.k);
        let rest = insns.len() - at - 1;
        let in_range = |offset: usize| offset < rest;
        let known = match code & 0x07 {
            LD => [W | ABS, H | ABS, B | ABS, W | IND, H | IND, B | IND, W | LEN, IMM, MEM]
                .contains(&(code & !0x07)),
            LDX => [W | IMM, W | MEM, W | LEN, B | MSH].contains(&(code & !0x07)),
            ST | STX => code & !0x07 == 0,
            ALU => {
                [ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR].contains(&(code & 0xf0))
                    && code & !0xff == 0
            }
            JMP => [JA, JEQ | K, JEQ | X, JGT | K, JGT | X, JGE | K, JGE | X, JSET | K, JSET | X]
                .contains(&(code & !0x07)),
            RET => code == RET | K || code == RET | RET_A,
            MISC => code == MISC | TAX || code == MISC | TXA,
            _ => false,
        };
        if !known {
            return Err(InvalidFilter::UnknownInstruction { at, code });
        }
        let mode = code & 0xe0;
        if matches!(code & 0x07, LD | LDX) && (mode == ABS || mode == IND || mode == MSH) && k >= 0x8000_0000
        {
            return Err(InvalidFilter::AncillaryLoad { at });
        }
        let uses_scratch = matches!(code & 0x07, LD | LDX) && mode == MEM || matches!(code & 0x07, ST | STX);
        if uses_scratch && k as usize >= SCRATCH_WORDS {
            return Err(InvalidFilter::ScratchOutOfRange { at });
        }
        if code & 0x07 == ALU && code & X == 0 && matches!(code & 0xf0, DIV | MOD) && k == 0 {
            return Err(InvalidFilter::DivisionByZero { at });
        }
        if code == JMP | JA {
            if !in_range(k as usize) {
                return Err(InvalidFilter::JumpOutOfRange { at });
            }
        } else if code & 0x07 == JMP && (!in_range(insn.jt.into()) || !in_range(insn.jf.into())) {
            return Err(InvalidFilter::JumpOutOfRange { at });
        }
    }
    if insns[insns.len() - 1].code & 0x07 != RET {
        return Err(InvalidFilter::NoReturnAtEnd);
    }
    Ok(())
}

/// A frame held in memory, as the host sees it.
pub struct Bytes<'a>(pub &'a [u8]);

impl Frame for Bytes<'_> {
    fn wire_len(&self) -> u32 {
        self.0.len() as u32
    }

    fn untagged(&self) -> bool {
        true
    }

    fn load(&self, _m: &mut Machine, offset: u32, size: u32) -> Option<u32> {
        let start = offset as usize;
        let bytes = self.0.get(start..start.checked_add(size as usize)?)?;
        let mut word = [0u8; 4];
        word[..bytes.len()].copy_from_slice(bytes);
        Some(big_endian(word, size))
    }
}
