#!/bin/bash
echo "hello from guest" > $VM_OUT/guest.log
ls -l /sys/bus/pci/devices/ >> $VM_OUT/guest.log
for d in /sys/bus/pci/devices/*; do echo "$d $(cat $d/class) $(readlink $d/driver) $(readlink $d/iommu_group)"; done >> $VM_OUT/guest.log
ls /dev/nvme* >> $VM_OUT/guest.log 2>&1
echo PASS > $VM_OUT/result
